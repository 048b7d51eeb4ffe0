#!/usr/bin/env bash
# The full-size benchmarks on a lent GPU machine (see bench/README.md), as prepared stages.
#   bash bench/gpu_run.sh [STAGE...]     default: the first call's stages (FIRST below)
#   bash bench/gpu_run.sh second         the second call's stages (SECOND below)
#   bash bench/gpu_run.sh --tiny [...]   a rehearsal here on the CPU: every stage's command
#                                        with --tiny (the tiny offline SD), $OUT defaulting to
#                                        a new temporary folder, no wheels, no nvidia-smi
# Expects wheels of the packages the machine lacks in .whl/ (diffusers, open_clip_torch, peft) and
# writes results and logs under $OUT. Stages run in the order given, each under its own time
# limit, so a slow or failing stage still leaves the others' figures; $OUT/stages.txt says how
# each one ended. A device call runs at most 600 s, so a session's 15 minutes are two calls,
# most needed figures first:
#   call 1 (timeout_s=600):           bash bench/gpu_run.sh         (FIRST: 540 s of limits)
#   call 2 (timeout_s=what is left):  bash bench/gpu_run.sh second  (SECOND: 390 s; the
#                                      last stages are cut if less is left, keeping the rest)
# The second call finds the first call's inductor cache when the machine is still warm:
# compile_train_warm measures what a later process (the next subject's worker) pays.
set -o pipefail
FIRST=(sampling gpu_tests compile_train)
SECOND=(compile_train_warm train_step compile_sampling profile)
TINY=() TRAIN_TINY=() SAMPLE_TINY=() TEST_TINY=()
if [ "$1" = --tiny ]; then  # later options win: bf16 autocast on the CPU, 4 sampling steps
    shift
    TINY=(--tiny) TRAIN_TINY=(--tiny --precision bf16) SAMPLE_TINY=(--tiny --steps 4)
    TEST_TINY=(--collect-only)  # the gpu tests refuse to run without CUDA: collect them only
    OUT=${OUT:-$(mktemp -d)}
    PYTHON=${PYTHON:-.venv/bin/python}
    echo "rehearsal on the CPU: results under $OUT"
else
    PYTHON=python3
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD:$PWD/tests
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
export PYTHONUNBUFFERED=1
# inductor's cache in the working tree (git-ignored): the device keeps it between calls
export TORCHINDUCTOR_CACHE_DIR=$PWD/.inductor-cache
$PYTHON -c "import torch, diffusers, transformers; print(torch.__version__, diffusers.__version__, transformers.__version__)" | tee -a "$OUT/gpu.txt"
stage() {  # stage NAME SECONDS COMMAND...: run one stage, log it, note how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "$name: exit ${PIPESTATUS[0]} after $((SECONDS - started)) s" | tee -a "$OUT/stages.txt"
}
run_stage() {
    case $1 in
    train_step)  # eager vs graphed step, channels-last and twice-the-rows variants
        stage train_step "${TRAIN_TIMEOUT:-120}" "$PYTHON" bench/train_step.py --bf16-frozen only \
            --methods custom-diffusion eqdiff --channels-last --batch-multiple 2 \
            "${TRAIN_TINY[@]}" --out "$OUT" ;;
    gpu_tests)  # graphed and compiled vs eager, training and sampling, on the tiny model
        stage gpu_tests "${TEST_TIMEOUT:-150}" "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q \
            "${TEST_TINY[@]}" tests/method/test_cuda_graphs.py tests/method/test_compilation.py ;;
    sampling)  # eager and graphed sampling against the pipeline
        stage sampling "${SAMPLE_TIMEOUT:-150}" "$PYTHON" bench/sampling_throughput.py --batch 8 \
            --steps 50 --repeat 1 "${SAMPLE_TINY[@]}" --out "$OUT" ;;
    profile)  # where the eager EqDiff step's time goes, by operator
        stage profile "${PROFILE_TIMEOUT:-50}" "$PYTHON" bench/profile_step.py "${TINY[@]}" \
            --out "$OUT" ;;
    compile_train)  # regional torch.compile inside the graphed step: compile time and ms/step
        stage compile_train "${COMPILE_TIMEOUT:-240}" "$PYTHON" bench/train_step.py \
            --bf16-frozen only --methods eqdiff --compile --no-reference "${TRAIN_TINY[@]}" \
            --out "$OUT/compile" ;;
    compile_train_warm)  # the same in a new process: the compile from inductor's disk cache
        stage compile_train_warm "${COMPILE_WARM_TIMEOUT:-120}" "$PYTHON" bench/train_step.py \
            --bf16-frozen only --methods eqdiff --compile --no-reference \
            "${TRAIN_TINY[@]}" --out "$OUT/compile_warm" ;;
    compile_sampling)
        stage compile_sampling "${COMPILE_SAMPLE_TIMEOUT:-100}" "$PYTHON" \
            bench/sampling_throughput.py --batch 8 --steps 50 --repeat 1 --variants rra \
            --batches-per-call 1 --compile "${SAMPLE_TINY[@]}" --out "$OUT/compile" ;;
    concepts_per_gpu)  # measured on the H100 already (docs/bench/concepts_per_gpu_h100.json)
        stage concepts_per_gpu "${CONCEPTS_TIMEOUT:-100}" "$PYTHON" bench/concepts_per_gpu.py \
            "${TINY[@]}" --out "$OUT" ;;
    *) echo "unknown stage $1" | tee -a "$OUT/stages.txt" ;;
    esac
}
if [ $# -eq 0 ]; then set -- "${FIRST[@]}"; elif [ "$1" = second ]; then set -- "${SECOND[@]}"; fi
for name in "$@"; do run_stage "$name"; done
