#!/usr/bin/env bash
# Refresh requirements/lock.txt, the exact versions scripts/setup.sh installs (README: "Refreshing the lock").
#
#   bash scripts/lock.sh                        # the newest releases that pyproject.toml's ranges admit
#   bash scripts/lock.sh "transformers==5.23.0" # ... with some packages held at a version
#
# It resolves in a throw-away venv (torch 2.13.0, the CPU build, first: a looser pin pulls a multi-GB CUDA build),
# installs prefixtune with every extra the tests use, and writes `pip freeze --all` of that venv. Run
# `bash scripts/test.sh` and `bash scripts/compat.sh` after it before committing the new lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
py="$tmp/venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q ".[test]" "$@"
{
  echo "# The exact versions the test suite is verified with; scripts/setup.sh installs these and nothing else."
  echo "# Written by: bash scripts/lock.sh $* (on $(date -u +%Y-%m-%d), $("$py" -c 'import sys; print("Python %d.%d" % sys.version_info[:2])'))"
  echo "# Library users get the ranges in pyproject.toml instead; docs/compatibility.md says which are tested."
  "$py" -m pip freeze --all --exclude-editable | grep -viE '^(prefixtune|#|-e )' | sed -E 's/^torch==([0-9.]+)\+cpu$/torch==\1/'
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
