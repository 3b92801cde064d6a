#!/usr/bin/env bash
# Everything that needs a GPU, in one go (the default stages' timeouts add up to 515 s, plus up
# to 10 s of kill-after per stage; on an H100, 2026-11-27, they took 8-9 + 98-105 + 26-30 + 73 s,
# and profile_train 21 s, profile_decode 24 s, bench_cell 41 s):
#
#     bash scripts/gpu_bundle.sh                       # first, on the development machine
#     OUT=/some/dir bash scripts/gpu_checks.sh         # on the GPU machine, from the repository
#                                                      # root, carrying .whl and .gpu_data
#     STAGES="bench_cell test_graphs" bash scripts/gpu_checks.sh     # only these stages
#
# Needs python3 with torch (CUDA), triton, numpy, pytest, sentencepiece; hydra-core and datasets
# come as the carried wheels, pyarrow too if the image's is older than 24 (only the recipe stage
# needs them). Writes under $OUT
# (at most 8 files come back from the device tool):
#     gpu_checks.log      everything printed below, stage by stage, with timings
#     gpu_checks.json     scripts/gpu_checks.py: Triton kernels on CUDA vs the reference; CUDA-graph
#                         training steps vs the same steps eager (20 steps, losses); graphed
#                         greedy/beam search vs eager
#     bench_train.json    scripts/bench_train.py: training tokens/s and decoding sentences/s,
#                         cuDNN vs ours, eager vs CUDA graphs (bf16, B=128, T=20, E=H=512, V=8000)
#     recipe_train.log    scripts/gpu_recipe.sh: experiment=multi30k_de_en trained for at most
#     recipe_timing.json  RECIPE_MINUTES (default 1.5) minutes: every validation's BLEU and time
#     bench_cell.json     scripts/bench_cell.py --quick: the gate cell alone (B=64, H=512, T=30)
#     profile_decode.json scripts/profile_decode.py: where a graphed decoding batch's time goes, ours
#                         with and without the search's kernels, and cuDNN
#     profile_train.json  scripts/profile_train.py: the kernels of one graphed training step, ours
#                         and cuDNN, by group
# The log ends with one line per stage: exit status and seconds.
# Default stages, most wanted first: environment gpu_checks bench_train recipe; also available:
# profile_decode profile_train test_kernels bench_cell test_graphs (STAGES=all runs all nine). A failing
# (or timed-out) stage does not stop the others. The exit status is the number of failed stages.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
unset TRITON_INTERPRET            # the real kernels (tests/conftest.py sets it only without /dev/nvidia0)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG="$OUT/gpu_checks.log"
SUMMARY="$(mktemp)"  # (in the log at the end: $OUT keeps to the 8 files the device tool returns)
: >"$LOG"
: >"$SUMMARY"
failed=0

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name: $* (timeout ${limit}s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local dt=$((SECONDS - t0))
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    [ "$rc" -eq 124 ] && echo "!!! $name timed out after ${limit}s" | tee -a "$LOG"
    echo "$name rc=$rc ${dt}s" | tee -a "$LOG" >>"$SUMMARY"
}

STAGES="${STAGES:-environment gpu_checks bench_train recipe}"
[ "$STAGES" = all ] && STAGES="environment gpu_checks bench_train recipe profile_decode profile_train test_kernels bench_cell test_graphs"
for name in $STAGES; do
    case $name in
    environment) stage environment 15 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"triton\", triton.__version__, torch.cuda.get_device_name())'" ;;
    # correctness first: kernels on CUDA tensors, graphs vs eager (training and decoding)
    gpu_checks) stage gpu_checks 190 "$PY" scripts/gpu_checks.py --json "$OUT/gpu_checks.json" ;;
    # the speed figures of docs/benchmarks.md
    bench_train) stage bench_train 110 "$PY" scripts/bench_train.py --json "$OUT/bench_train.json" ;;
    # the full recipe, timed to its best validation BLEU (stops after RECIPE_MINUTES of training)
    recipe) stage recipe 200 env RECIPE_MINUTES="${RECIPE_MINUTES:-1.5}" OUT="$OUT" PYTHON="$PY" bash scripts/gpu_recipe.sh ;;
    profile_decode) stage profile_decode 180 "$PY" scripts/profile_decode.py --json "$OUT/profile_decode.json" \
        --cells ours ours-row-topk ours-topk-only ours-host-output ours-torch-attention ours-torch-search cudnn ;;
    profile_train) stage profile_train 90 "$PY" scripts/profile_train.py --json "$OUT/profile_train.json" ;;
    # the gate-cell tests (interpreter on CPU tensors), the CUDA-graph LSTM test (real kernels, in
    # a subprocess) and the sm_90 compile test
    test_kernels) stage test_kernels 240 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py ;;
    bench_cell) stage bench_cell 90 "$PY" scripts/bench_cell.py --quick --json "$OUT/bench_cell.json" ;;
    # the CPU-side graph tests under this machine's torch (API drift between torch versions)
    test_graphs) stage test_graphs 40 "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py ;;
    *) echo "gpu_checks: unknown stage $name" | tee -a "$LOG"; failed=$((failed + 1)) ;;
    esac
done

echo "=== summary ($failed failed)" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
rm -f "$SUMMARY"
exit "$failed"
