#!/usr/bin/env bash
# Prepares what `python -m mt.train` needs on a GPU machine whose python lacks hydra-core and
# datasets (benchmarks/gpu_recipe.sh, the recipe stage of benchmarks/run_gpu.sh), as git-ignored
# folders in the repository root, to copy to that machine's checkout:
#
#     bash benchmarks/gpu_bundle.sh [DATA_DIR]      # DATA_DIR defaults to ../shared/data/multi30k
#     MAX_MIB=64 bash benchmarks/gpu_bundle.sh      # also fail if checkout + bundle exceed 64 MiB
#
#   .whl/       wheels of hydra-core, omegaconf, antlr4, datasets and its pure-Python needs, at
#               the versions constraints.txt pins, for CPython 3.12 on x86-64, from this
#               machine's package index
#   .whl/pyarrow/  pyarrow's wheel (55 MB), installed there only if the GPU machine's pyarrow is
#               older than the 24 datasets needs
#   .gpu_data/  the Multi30k jsonl files, gzipped (data is never committed: both folders are
#               in .gitignore); gpu_recipe.sh unpacks them
# It prints the size of the checkout's files plus both folders (what a copy moves); with
# MAX_MIB set, a larger total is an error.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/multi30k}"
PY="${PYTHON:-python3}"
pin() {  # the version constraints.txt pins for a package
    local v
    v=$(grep -i -E "^$1==" constraints.txt | head -1 | cut -d= -f3)
    [ -n "$v" ] || { echo "gpu_bundle: $1 is not pinned in constraints.txt" >&2; exit 1; }
    echo "$1==$v"
}
rm -rf .whl .gpu_data
mkdir -p .whl .gpu_data
# binary-compatible pure-Python wheels; datasets' other needs (pyarrow, pandas, numpy, xxhash,
# requests, tqdm, pyyaml, huggingface-hub) are expected on the GPU machine
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin hydra-core)" "$(pin omegaconf)" "$(pin datasets)" "$(pin dill)" "$(pin multiprocess)" "$(pin fsspec)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl/pyarrow "$(pin pyarrow)"
# antlr4-python3-runtime 4.9.x (what hydra-core 1.3 needs) is published as a source archive only
"$PY" -m pip wheel -q --no-deps -w .whl "$(pin antlr4-python3-runtime)"
[ -f "$DATA/train.jsonl" ] || { echo "gpu_bundle: no $DATA/train.jsonl" >&2; exit 1; }
mkdir -p .gpu_data/multi30k
for f in "$DATA"/*.jsonl; do
    gzip -9 -c "$f" >".gpu_data/multi30k/$(basename "$f").gz"
done
ls -l .whl .whl/pyarrow .gpu_data/multi30k
# the size of a copy: the tracked and untracked-but-not-ignored files, plus these two folders
size() { xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }  # files gone: skipped
tree=$(git ls-files -z --cached --others --exclude-standard | size)
extra=$(find .whl .gpu_data -type f -print0 | size)
total=$((tree + extra))
echo "gpu_bundle: the checkout with .whl and .gpu_data comes to $((total / 1048576)) MiB"
if [ -n "${MAX_MIB:-}" ] && [ "$total" -gt $((MAX_MIB * 1048576)) ]; then
    echo "gpu_bundle: more than MAX_MIB=$MAX_MIB MiB" >&2
    exit 1
fi
