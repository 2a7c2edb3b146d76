#!/usr/bin/env bash
# The prepared GPU check of issue 13, for a session lent a GPU machine (device tool, kind
# nvidia-h200; /work/.library/device/README.md). Here first: `bash bench/gpu_wheels.sh`.
# Then one device call, e.g.
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# It installs the carried wheels, runs tests/test_gpu.py (cuda against cpu on the same
# specs) and bench/run_gpu_bench.py (task arithmetic and TIES on W1, cuda vs cpu), and
# leaves gpu.txt, test_gpu.log, bench.log, gpu_bench.md and gpu_bench.json under $OUT.
# Record the figures in bench/results/ and docs/cluster.md ("GPU").
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, fusionlang; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 \
    | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log"
timeout 300 python3 bench/run_gpu_bench.py --out "$OUT" --params 0.5B --experts 4 --repeat 2 2>&1 | tee "$OUT/bench.log"
