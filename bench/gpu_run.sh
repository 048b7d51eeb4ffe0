#!/usr/bin/env bash
# The full-size benchmarks on a lent GPU machine, as one prepared run (see bench/README.md).
# Expects wheels of the packages the machine lacks in .whl/ (diffusers, open_clip_torch) and
# writes results and logs under $OUT. Stages run most important first, each under its own
# time limit, so a slow or failing stage still leaves the others' figures.
# The limits add up to 580 s, inside one 600 s device call: run it with timeout_s=600.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
stage() {  # stage NAME SECONDS COMMAND...: run one stage, log it, note how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$OUT/stages.txt"
}
stage train_step "${TRAIN_TIMEOUT:-200}" python3 bench/train_step.py --bf16-frozen only \
    --channels-last --batch-multiple 2 --out "$OUT"
stage gpu_tests "${TEST_TIMEOUT:-80}" python3 -m pytest -p no:cacheprovider -m gpu -q \
    tests/test_cuda_graphs.py
stage profile "${PROFILE_TIMEOUT:-50}" python3 bench/profile_step.py --out "$OUT"
stage concepts_per_gpu "${CONCEPTS_TIMEOUT:-100}" python3 bench/concepts_per_gpu.py --out "$OUT"
stage sampling "${SAMPLE_TIMEOUT:-150}" python3 bench/sampling_throughput.py --batch 8 \
    --steps 50 --repeat 1 --out "$OUT"
