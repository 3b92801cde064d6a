#!/usr/bin/env bash
# The full Multi30k de->en GPU recipe, timed to its best validation BLEU:
#
#     OUT=/some/dir bash benchmarks/gpu_recipe.sh [extra mt.train overrides...]
#
# For a GPU machine whose python has torch, triton, sentencepiece, sacrebleu and tensorboard
# but not hydra-core or datasets: run benchmarks/gpu_bundle.sh where those packages and the data
# are at hand, and copy .whl and .gpu_data to the GPU machine's checkout. The wheels go into
# /tmp/site (PYTHONPATH), its pyarrow too if the machine's is older than 24 (datasets needs it).
# Unpacks the gzipped corpus to /tmp/gpu_data and runs
#     python3 -m mt.train experiment=multi30k_de_en data.path=/tmp/gpu_data/multi30k ...
# in /tmp/recipe (RECIPE_RUN; its checkpoints stay there) with an empty Triton cache (a first
# run's compile time counts) and writes under $OUT (default ./gpu_out):
#     recipe_train.log     the run's train.log
#     recipe_timing.json   benchmarks/recipe_timing.py: every validation's BLEU and time, the best,
#                          and the log's "precompile: ..." and "triton: ..." lines (what compiling
#                          the Triton kernels cost: mt/precompile.py)
# RECIPE_MINUTES bounds the training (default: no bound); benchmarks/run_gpu.sh runs this as its
# stage "recipe". Killed (TERM, e.g. by a timeout), it still copies the log and times what it holds.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
PY="${PYTHON:-python3}"
RUN="${RECIPE_RUN:-/tmp/recipe}"
mkdir -p "$OUT"
if [ ! -f .gpu_data/multi30k/train.jsonl.gz ] || ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_recipe: .whl/ or .gpu_data/multi30k/ missing: run benchmarks/gpu_bundle.sh and copy both here" >&2
    exit 3
fi
DATA="${RECIPE_DATA:-/tmp/gpu_data/multi30k}"
mkdir -p "$DATA"
for f in .gpu_data/multi30k/*.jsonl.gz; do
    gunzip -c "$f" >"$DATA/$(basename "$f" .gz)" || { echo "gpu_recipe: cannot unpack $f" >&2; exit 3; }
done
wheels=()
"$PY" -c "import hydra, datasets" 2>/dev/null || wheels+=(.whl/*.whl)
if ! "$PY" -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
    if ls .whl/pyarrow/*.whl >/dev/null 2>&1; then
        wheels+=(.whl/pyarrow/*.whl)
    else
        echo "gpu_recipe: datasets needs pyarrow >= 24, this python has an older one or none, and .whl/pyarrow/ has no wheel" >&2
        exit 5
    fi
fi
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
        || { echo "gpu_recipe: installing the wheels of .whl/ failed" >&2; exit 4; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import hydra, datasets, pyarrow, torch; print('gpu_recipe: hydra', hydra.__version__, '| datasets', \
datasets.__version__, '| pyarrow', pyarrow.__version__, '| torch', torch.__version__)" \
    || { echo "gpu_recipe: hydra/datasets do not import (datasets needs pyarrow >= 24)" >&2; exit 5; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
# A first run on a machine compiles every Triton kernel variant it meets (about a second each):
# time that, not a cache warmed by the stages before (RECIPE_TRITON_CACHE=DIR to reuse one)
export TRITON_CACHE_DIR="${RECIPE_TRITON_CACHE:-$(mktemp -d /tmp/recipe_triton.XXXXXX)}"
rm -rf "$RUN"
started=$EPOCHREALTIME
report() {  # also when a stage timeout kills the training: keep what it logged
    echo "gpu_recipe: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l) Triton kernels compiled into $TRITON_CACHE_DIR"
    cp "$RUN/train.log" "$OUT/recipe_train.log" 2>/dev/null
    "$PY" benchmarks/recipe_timing.py "$RUN/train.log" --started "$started" --json "$OUT/recipe_timing.json"
}
trap 'report; exit 143' TERM INT
"$PY" -m mt.train experiment=multi30k_de_en data.path="$DATA" data.cache_dir=/tmp/mtcache \
    hydra.run.dir="$RUN" trainer.progress=false trainer.max_minutes="${RECIPE_MINUTES:-0}" "$@" &
wait $!  # in the background, so that a TERM reaches the trap at once
rc=$?
trap - TERM INT
echo "gpu_recipe: mt.train exit status $rc after $(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
report || rc=$((rc ? rc : 6))
exit "$rc"
