#!/usr/bin/env bash
# README command 2: set up, then run the tests (tiny random models; the few `slow` ones use smollm2-135m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The playground test drives Debian's Chromium; install it where we can (root with apt), else it is skipped.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "scripts/test.sh: could not install chromium; the browser test will be skipped" >&2
fi
.venv/bin/ruff check src tests bench examples
exec .venv/bin/python -m pytest "$@"
