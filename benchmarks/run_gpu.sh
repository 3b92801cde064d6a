#!/usr/bin/env bash
# On a GPU machine, from the repository root: the GPU tests, then the benchmarks and profilers,
# each a stage with a timeout; their numbers are what docs/benchmarks.md records.
#
#     bash benchmarks/run_gpu.sh                                # every stage, into ./gpu_out
#     OUT=/some/dir STAGES="pytest bench_train" bash benchmarks/run_gpu.sh
#
# Stages, in this order (the default runs all; one failing does not stop the others):
#     environment     the GPU, driver and versions
#     pytest          python -m pytest -m gpu       -> pytest_gpu.xml (junit)
#     bench_train     benchmarks/bench_train.py      -> bench_train.json
#     bench_train_wmt benchmarks/bench_train.py --preset wmt: the WMT-size model, 16k-token batches,
#                     every bucket up to length 128 captured  -> bench_train_wmt.json
#     bench_train_wmt256  the same up to length 256   -> bench_train_wmt256.json
#     bench_train_fused   bench_train.py --fused-loss: the graphed training columns with the loss in
#                     Triton kernels (trainer.fused_loss=true)  -> bench_train_fused.json
#     bench_loss      benchmarks/bench_loss.py: the loss alone, PyTorch's against the fused kernel,
#                     Multi30k and WMT-size logits  -> bench_loss.json
#     bench_decode    benchmarks/bench_decode.py --random-init on the Multi30k test file
#                     (DATA/test.jsonl with DATA=/path/to/multi30k, else the one
#                     benchmarks/gpu_bundle.sh packed)  -> bench_decode.json
#     bench_ensemble  benchmarks/bench_decode.py --random-init --ensemble 1 2 4: what ensembles of
#                     2 and 4 models cost against one, same test file  -> bench_ensemble.json
#     bench_cell      benchmarks/bench_cell.py --quick  -> bench_cell.json (fp32 rows: TF32 as PyTorch's defaults allow)
#     bench_cell_ieee the fp32 rows again in IEEE fp32 (--tf32 false)  -> bench_cell_ieee.json
#     profile_train   benchmarks/profile_train.py (ours-fused-loss among its cells)  -> profile_train.json
#     profile_decode  benchmarks/profile_decode.py, every variant  -> profile_decode.json
#     recipe          benchmarks/gpu_recipe.sh, training bounded by RECIPE_MINUTES (default 1.5)
#                     -> recipe_train.log, recipe_timing.json (needs gpu_bundle.sh's folders)
# Each stage's output goes to OUT/STAGE.log; summary.txt gets one line per stage (exit status,
# seconds). The exit status is the number of failed stages. PYTHON picks the interpreter.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
STAGES="${STAGES:-environment pytest bench_train bench_train_wmt bench_train_wmt256 bench_train_fused bench_loss bench_decode bench_ensemble bench_cell bench_cell_ieee profile_train profile_decode recipe}"
mkdir -p "$OUT"
unset TRITON_INTERPRET  # the compiled kernels, not the interpreter
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
: >"$OUT/summary.txt"
failed=0

stage() {  # stage NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    echo "=== $name: $* (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

test_file() {  # the Multi30k test file: DATA's, else gpu_bundle.sh's, unpacked
    local f="${DATA:-.gpu_data/none}/test.jsonl"
    if [ ! -f "$f" ] && [ -f .gpu_data/multi30k/test.jsonl.gz ]; then
        f="$(mktemp -d)/test.jsonl"
        gunzip -c .gpu_data/multi30k/test.jsonl.gz >"$f"
    fi
    echo "$f"
}

for name in $STAGES; do
    case $name in
    environment) stage "$name" 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, \"cuDNN\", torch.backends.cudnn.version(), \"triton\", triton.__version__, torch.cuda.get_device_name())'" ;;
    pytest) stage "$name" 500 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml" tests ;;
    bench_train) stage "$name" 110 "$PY" benchmarks/bench_train.py --json "$OUT/bench_train.json" ;;
    bench_train_wmt) stage "$name" 300 "$PY" benchmarks/bench_train.py --preset wmt --json "$OUT/bench_train_wmt.json" ;;
    bench_train_wmt256) stage "$name" 400 "$PY" benchmarks/bench_train.py --preset wmt --max-len 256 \
        --json "$OUT/bench_train_wmt256.json" ;;
    bench_train_fused) stage "$name" 110 "$PY" benchmarks/bench_train.py --fused-loss --tasks train \
        --columns cudnn_graphs ours_graphs --json "$OUT/bench_train_fused.json" ;;
    bench_loss) stage "$name" 90 "$PY" benchmarks/bench_loss.py --json "$OUT/bench_loss.json" ;;
    bench_decode) stage "$name" 300 "$PY" benchmarks/bench_decode.py --random-init --device cuda --data "$(test_file)" \
        --json "$OUT/bench_decode.json" ;;
    bench_ensemble) stage "$name" 240 "$PY" benchmarks/bench_decode.py --random-init --device cuda --data "$(test_file)" \
        --ensemble 1 2 4 --json "$OUT/bench_ensemble.json" ;;
    bench_cell) stage "$name" 90 "$PY" benchmarks/bench_cell.py --quick --json "$OUT/bench_cell.json" ;;
    bench_cell_ieee) stage "$name" 90 "$PY" benchmarks/bench_cell.py --quick --dtype fp32 --tf32 false \
        --json "$OUT/bench_cell_ieee.json" ;;
    profile_train) stage "$name" 120 "$PY" benchmarks/profile_train.py --json "$OUT/profile_train.json" ;;
    profile_decode) stage "$name" 180 "$PY" benchmarks/profile_decode.py --json "$OUT/profile_decode.json" \
        --cells ours ours-row-topk ours-topk-only ours-host-output ours-torch-attention ours-torch-search cudnn ;;
    recipe) stage "$name" 200 env RECIPE_MINUTES="${RECIPE_MINUTES:-1.5}" OUT="$OUT" PYTHON="$PY" \
        bash benchmarks/gpu_recipe.sh ;;
    *) echo "run_gpu: unknown stage $name" | tee -a "$OUT/summary.txt"; failed=$((failed + 1)) ;;
    esac
done

echo "=== $failed failed"
cat "$OUT/summary.txt"
exit "$failed"
