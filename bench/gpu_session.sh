#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (no network there; its own torch, transformers and peft):
# the machine's facts, bench/gpu.py (speed), bench/gpu_check.py (fast paths, kernels, resume on the GPU's
# kernels) and the CLI and device tests with CUDA present. Each part has its own time limit and writes its
# output as it goes, so a part cut short loses nothing the others measured. Run from the repository root:
#   OUT=/some/dir bash bench/gpu_session.sh     # .whl/*.whl, if present, are installed first (PEFT as locked)
# The wheels, fetched here beforehand (the GPU machine has no network; .whl/ is in .git/info/exclude):
#   echo /.whl/ >> .git/info/exclude; .venv/bin/python -m pip download --no-deps --only-binary=:all: \
#     --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 -d .whl peft==0.21.2
# The device call: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=560)
set -uo pipefail
OUT=${OUT:-runs/gpu-session}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=src
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:src
fi
{
  date -u
  nvidia-smi
  python3 -c "import sys, torch, transformers, peft; print(sys.version.split()[0], torch.__version__, torch.version.cuda, transformers.__version__, peft.__version__)"
  lscpu | grep -E 'Model name|^CPU\(s\)|Flags'
} >"$OUT/env.txt" 2>&1
start=$(date +%s)
timeout 300 python3 bench/gpu.py --json "$OUT/gpu.json" --budget-s 250 >"$OUT/gpu.log" 2>&1
echo "bench/gpu.py rc=$? after $(($(date +%s) - start)) s"
start=$(date +%s)
timeout 140 python3 bench/gpu_check.py --json "$OUT/check.json" >"$OUT/check.log" 2>&1
echo "bench/gpu_check.py rc=$? after $(($(date +%s) - start)) s"
start=$(date +%s)
timeout 75 python3 -m pytest -p no:cacheprovider -q -W ignore -rfE tests/test_device_dtype.py tests/test_train_cli.py \
  >"$OUT/pytest.log" 2>&1
echo "pytest rc=$? after $(($(date +%s) - start)) s"
tail -5 "$OUT/pytest.log"
grep -h '"error"' "$OUT/gpu.log" "$OUT/check.log" | cut -c1-400
