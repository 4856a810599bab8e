#!/usr/bin/env bash
# The compatibility matrix: one venv per transformers version, the core tests in each, one table.
#
#   bash scripts/compat.sh                  # the oldest pyproject.toml admits, the locked one, the newest released
#   bash scripts/compat.sh 5.10.0 5.24.0    # these versions
#
# Each venv (under .compat/, reused while the lock is unchanged) holds requirements/lock.txt with transformers
# replaced by the version under test (pip then moves only what that transformers requires, e.g. tokenizers).
# The core tests are the suite without the `slow` (real model) and `browser` tests. The table gives our
# passed / failed / expected-failure counts and whether PEFT's own prefix-tuning runs with that transformers.
# Paste the table into docs/compatibility.md with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/lock.txt
locked=$(grep -E '^transformers==' "$LOCK" | cut -d= -f3)
if [ $# -gt 0 ]; then
  versions=("$@")
else
  oldest=$(grep -oE '"transformers>=[0-9.]+' pyproject.toml | cut -d= -f2)
  newest=$("$PYTHON" -m pip index versions transformers 2>/dev/null | sed -nE 's/^transformers \(([^)]+)\).*/\1/p')
  [ -n "$newest" ] || { echo "scripts/compat.sh: cannot ask the registry for transformers' newest release" >&2; exit 2; }
  versions=("$oldest" "$locked" "$newest")
fi
mkdir -p .compat
rows=()
for v in $(printf '%s\n' "${versions[@]}" | awk '!seen[$0]++'); do
  venv=.compat/transformers-$v
  stamp=$venv/.installed
  want=$( (cat "$LOCK"; echo "$v") | sha256sum | cut -c1-16)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    echo "== transformers $v: installing (log: $venv/install.log)" >&2
    if ! { "$venv/bin/python" -m pip install -q "$(grep -E '^pip==' "$LOCK")" &&
           "$venv/bin/python" -m pip install -q --no-deps -r <(grep -vE '^(pip|transformers)==' "$LOCK") &&
           "$venv/bin/python" -m pip install -q "transformers==$v" &&
           "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . ; } >"$venv/install.log" 2>&1; then
      rows+=("| $v | install failed: $(grep -E '^ERROR' "$venv/install.log" | tail -1 | cut -c1-100) | | | | | |")
      continue
    fi
    echo "$want" > "$stamp"
  fi
  echo "== transformers $v: core tests" >&2
  # -o addopts= : the project's own -q would make this -qq, which prints no closing counts line
  "$venv/bin/python" -m pytest -q -o addopts= -p no:cacheprovider -m "not slow and not browser" \
    >"$venv/pytest.log" 2>&1 || true
  summary=$(grep -E '[0-9]+ (passed|failed)' "$venv/pytest.log" | tail -1 | tr -d '=' || true)
  count() { echo "$summary" | grep -oE "[0-9]+ $1" | cut -d' ' -f1 || true; }
  peft=$(cd tests && "../$venv/bin/python" -c 'from peft_support import peft_prefix_tuning_broken as b; r = b(); print("runs" if r is None else "no: " + r.split(": ", 1)[1])' 2>/dev/null || echo "probe failed")
  hub=$("$venv/bin/python" -c 'import huggingface_hub, tokenizers; print(huggingface_hub.__version__, tokenizers.__version__)')
  mark=""; [ "$v" = "$locked" ] && mark=" (locked)"
  rows+=("| $v$mark | ${hub% *} / ${hub#* } | $(count passed) | $(count failed) | $(count xfailed) | $(count error) | $peft |")
done
echo
echo "| transformers | huggingface_hub / tokenizers | passed | failed | xfailed | errors | PEFT's prefix-tuning |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
printf '%s\n' "${rows[@]}"
