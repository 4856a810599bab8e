#!/usr/bin/env bash
# README command 1: set up, then train and evaluate a prefix for smollm2-135m on E2E (built-in model and data).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Use the workplace's copy of the data when it is there; otherwise prefixtune fetches it from the registry.
if [ -z "${PREFIXTUNE_DATA_DIR:-}" ] && [ -f ../shared/data/e2e_nlg.json ]; then
  export PREFIXTUNE_DATA_DIR="$(cd ../shared/data && pwd)"
fi
exec .venv/bin/prefixtune demo "$@"
