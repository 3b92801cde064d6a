#!/usr/bin/env bash
# Everything that needs a GPU, in one go (not yet run on a GPU; the stage timeouts add up to 8 minutes,
# plus up to 10 s of kill-after per stage):
#
#     OUT=/some/dir bash scripts/gpu_checks.sh        # from the repository root; OUT defaults to ./gpu_out
#
# Needs python3 with torch (CUDA), triton, numpy, pytest, sentencepiece, pyarrow; no hydra-core,
# no datasets. Writes under $OUT:
#     gpu_checks.log    everything printed below, stage by stage, with timings
#     gpu_checks.json   scripts/gpu_checks.py: Triton kernels on CUDA vs the reference; CUDA-graph
#                       training steps vs the same steps eager (20 steps, losses); graphed decoding
#                       vs eager
#     bench_train.json  scripts/bench_train.py: training tokens/s and decoding sentences/s,
#                       cuDNN vs ours, eager vs CUDA graphs (bf16, B=128, T=20, E=H=512, V=8000)
#     bench_cell.json   scripts/bench_cell.py --quick: the gate cell alone (B=64, H=512, T=30)
#     summary.txt       one line per stage: exit status and seconds
# Stages run one after the other; a failing (or timed-out) stage does not stop the others.
# The exit status is the number of failed stages.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
unset TRITON_INTERPRET            # the real kernels (tests/conftest.py sets it only without /dev/nvidia0)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
LOG="$OUT/gpu_checks.log"
SUMMARY="$OUT/summary.txt"
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

stage environment 15 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"triton\", triton.__version__, torch.cuda.get_device_name())'"
# correctness first: kernels on CUDA tensors, graphs vs eager (training and decoding)
stage gpu_checks 170 "$PY" scripts/gpu_checks.py --json "$OUT/gpu_checks.json"
# the gate-cell tests (interpreter on CPU tensors), the CUDA-graph LSTM test (real kernels, in a
# subprocess) and the sm_90 compile test
stage test_kernels 75 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_kernels.py
# the speed figures of docs/benchmarks.md
stage bench_train 110 "$PY" scripts/bench_train.py --json "$OUT/bench_train.json"
stage bench_cell 60 "$PY" scripts/bench_cell.py --quick --json "$OUT/bench_cell.json"
# the CPU-side graph tests under this machine's torch (API drift between torch versions)
stage test_graphs 50 "$PY" -m pytest -q -p no:cacheprovider tests/test_graphs.py

echo "=== summary ($failed failed)" | tee -a "$LOG"
cat "$SUMMARY" | tee -a "$LOG"
exit "$failed"
