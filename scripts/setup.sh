#!/usr/bin/env bash
# Create .venv with exactly the versions in requirements/lock.txt, then prefixtune itself (editable, no deps).
# Idempotent: a stamp records the lock and pyproject it installed; a change to either reinstalls. A failed install
# leaves no stamp, so the next run tries again instead of trusting a half-made venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
stamp=.venv/.prefixtune-installed
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
rm -f "$stamp"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
install() {
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    missing=$(grep -oE "(No matching distribution found for|satisfies the requirement) [^ ]+" "$log" | head -1 | awk '{print $NF}')
    if [ -n "$missing" ]; then
      echo "scripts/setup.sh: the registry does not serve $missing, which $LOCK asks for; refresh the lock with 'bash scripts/lock.sh' (README: Refreshing the lock)" >&2
    else
      echo "scripts/setup.sh: pip install $* failed; its last lines:" >&2
      tail -5 "$log" >&2
    fi
    exit 1
  fi
}
# pip itself first (the lock's version), then every locked package exactly as pinned, with nothing resolved
# anew (torch==2.13.0 is the CPU build on this disk; a looser pin would pull a multi-GB CUDA build).
install "$(grep -E '^pip==' "$LOCK")"
install --no-deps -r <(grep -vE '^pip==' "$LOCK")
install --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check >"$log" 2>&1 || { echo "scripts/setup.sh: the locked set is inconsistent:" >&2; cat "$log" >&2; exit 1; }
echo "$want" > "$stamp"
