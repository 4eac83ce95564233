#!/usr/bin/env bash
# The GPU checks and figures in one go, on a CUDA machine with the repository installed (pip install -e
# ".[dev,gpu]"): the Triton kernel tests compiled (not interpreted), the GPU correctness checks of
# bench/gpu_step.py (Triton chunk step and memory against torch, flash-attn path against the torch path),
# then bench/gpu_step.py's step timings for the 760M models, the 760M MAC again with TF32 float32 matmuls
# (the memory's state and update run in float32 under bf16 autocast) and the 340M models. Why one script:
# GPU time comes in short sessions, and every step has its own time limit, so a hang or a slow kernel
# costs one step, not the session. Compiling takes most of the time (the depth-2 float32 Triton kernels at
# the paper's shape take minutes, FlexAttention tens of seconds per shape). With no steps named it runs
# $DEFAULT_STEPS (the short-lease steps below split the same work differently): about 20 minutes.
# A short lease: `environment triton-checks scan-launches` in one 10-minute call, then at once (the machine
# stays warm only briefly) `chunk-step profile-760m-mac`; `train-smoke` a short third one.
#
#     bench/gpu_checks.sh OUT_DIR        # every step's output in OUT_DIR/<step>.log, OUT_DIR/summary.txt
#     bench/gpu_checks.sh OUT_DIR gpu-checks step-340m   # only the steps named (to rerun one, or fit a
#                                                        # short GPU lease); unknown names are an error
#
# Exit status: 0 when every step passed, 1 otherwise (the summary says which).
set -u

DEFAULT_STEPS="environment gpu-checks triton-tests step-760m step-760m-tf32 step-340m"
STEPS="$DEFAULT_STEPS triton-checks chunk-step profile-760m-mac step-760m-mac attention-checks train-smoke"
STEPS="$STEPS step-760m-mac-compiled scan-launches generate fsdp"
if [ $# -lt 1 ]; then
    echo "usage: $0 OUT_DIR [STEP ...]   (steps: $STEPS)" >&2
    exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd)
shift
for name in "$@"; do
    case " $STEPS " in
        *" $name "*) ;;
        *) echo "$0: unknown step '$name' (steps: $STEPS)" >&2; exit 2 ;;
    esac
done
chosen=" ${*:-$DEFAULT_STEPS} "
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-$(command -v python || command -v python3)}  # images often have only python3
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1  # compiled kernels; output as it comes
start=$SECONDS
failed=0
: > "$out/summary.txt"

# step NAME LIMIT_SECONDS COMMAND...: run it under a time limit, its output to the terminal and the log
step() {
    local name=$1 limit=$2
    shift 2
    [[ $chosen == *" $name "* ]] || return 0
    echo "=== [$((SECONDS - start)) s] $name (limit $limit s): $*"
    local begin=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]} verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAILED (exit $rc)"
    fi
    [ "$verdict" = ok ] || failed=1
    echo "$name: $verdict after $((SECONDS - begin)) s" | tee -a "$out/summary.txt"
}

step environment 20 bash -c "nvidia-smi; git log -1 --format='commit %H %s'; $python -c '
import torch, importlib.metadata as m
def v(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return \"not installed\"
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print(\"triton\", v(\"triton\"), \"flash-attn\", v(\"flash-attn\"))'"
# A short lease: `environment triton-checks scan-launches`, then `chunk-step profile-760m-mac`. The Triton
# checks compile the paper-shape kernels first (per chunk and whole-scan, IEEE), so the later steps find them
# in Triton's cache; the scan's launches (hidden tile × warps, chosen from the compiler's register report)
# are timed against each other, TF32 rows first; the profile says where a MAC step's time goes beside the
# chunk step's kernels.
step triton-checks 480 "$python" bench/gpu_step.py --check-only triton
step scan-launches 300 "$python" bench/gpu_step.py --scan-launches --sizes 760m --variants mac --repeats 5
step chunk-step 200 "$python" bench/gpu_step.py --chunk-step --sizes 760m --variants mac --repeats 5
step profile-760m-mac 180 "$python" bench/gpu_step.py --sizes 760m --variants mac --repeats 3 --row-budget-s 8 \
    --profile 40 train.fp32_matmul=tf32
# The training job itself on the GPU (README command 1 with the Triton kernel, TF32, 30 steps, bf16): what a
# user runs first, steps 20-22 profiled (train.profile_start: the CUDA activities, the device-time table).
# Needs the data pipeline's webdataset and braceexpand importable (an offline machine: their wheels, both
# pure Python).
step train-smoke 150 "$python" -m pretrain.train --config configs/tiny.yaml train.steps=30 train.eval_every=30 \
    train.checkpoint_every=30 model.memory_kernel=triton train.fp32_matmul=tf32 train.profile_start=20 \
    train.out_dir="${TMPDIR:-/tmp}/gpu-checks-train-smoke"
step step-760m-mac 190 "$python" bench/gpu_step.py --sizes 760m --variants mac --repeats 5 --row-budget-s 12
# Each block compiled whole (train.compile; the memory's scan a custom op inside it) against the eager MAC
# step: whether launches set the eager step's time. The first step compiles (minutes at this size).
step step-760m-mac-compiled 420 "$python" bench/gpu_step.py --sizes 760m --variants mac,swa --repeats 5 \
    --row-budget-s 12 train.fp32_matmul=tf32 train.compile=true
step attention-checks 100 "$python" bench/gpu_step.py --check-only attention
# Streaming generation in bf16 (flash or FlexAttention over cached keys that start before the queries), and
# the real flash / flex paths against the torch path with such keys.
step generate 240 bash -c "$python -m pytest -o addopts= -q -p no:cacheprovider tests/test_attention.py -k real_ &&
    $python bench/generate.py --device cuda --contexts 2048 8192 --new-tokens 64 \
    --model dim=1024 n_heads=16 window=1024 memory_chunk=64"
# FSDP on one GPU (NCCL) gathering in bf16: the loss and gradients bitwise the model's with bf16 weights.
step fsdp 120 "$python" -m pytest -o addopts= -q -p no:cacheprovider tests/test_fsdp.py -k "bfloat16_weights"
step gpu-checks 540 "$python" bench/gpu_step.py --check-only
# serially, without pyproject's addopts: one GPU, and pytest-xdist need not be installed here
step triton-tests 240 "$python" -m pytest -o addopts= -v -p no:cacheprovider tests/test_triton_chunk_step.py
step step-760m 300 "$python" bench/gpu_step.py --sizes 760m --repeats 5 --row-budget-s 12
step step-760m-tf32 90 "$python" bench/gpu_step.py --sizes 760m --variants mac --repeats 5 --row-budget-s 12 \
    train.fp32_matmul=tf32
step step-340m 100 "$python" bench/gpu_step.py --sizes 340m --repeats 5 --row-budget-s 12

{
    echo "--- checks that did not pass, and the targets"
    grep -s -h -E "^check .*: FAIL|^# target:|^# note:" "$out"/gpu-checks.log "$out"/step-*.log
    echo "total $((SECONDS - start)) s"
} | tee -a "$out/summary.txt"
exit $failed
