#!/usr/bin/env bash
# The full-size benchmarks on a lent GPU machine, as one prepared run (see bench/README.md).
# Expects wheels of the packages the machine lacks in .whl/ (diffusers, open_clip_torch) and
# writes results and logs under $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout "${TRAIN_TIMEOUT:-270}" python3 bench/train_step.py --out "$OUT" 2>&1 | tee "$OUT/train_step.log"
timeout "${SAMPLE_TIMEOUT:-180}" python3 bench/sampling_throughput.py --steps 50 --repeat 2 \
    --out "$OUT" 2>&1 | tee "$OUT/sampling.log"
