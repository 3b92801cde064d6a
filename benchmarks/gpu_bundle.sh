#!/usr/bin/env bash
# Prepares what `python -m mt.train` needs on the GPU machine beyond its image, as git-ignored
# folders in the repository root that the device tool carries (see scripts/gpu_checks.sh):
#
#     bash scripts/gpu_bundle.sh [DATA_DIR]      # DATA_DIR defaults to ../shared/data/multi30k
#
#   .whl/       wheels of the packages the GPU image lacks (hydra-core, omegaconf, antlr4,
#               datasets and its pure-Python needs), at the versions constraints.txt pins,
#               for CPython 3.12 on x86-64; pip reads them from this machine's package index
#   .whl/pyarrow/  pyarrow's wheel (55 MB), installed there only if the image's pyarrow is older
#               than the 24 datasets needs (its version there was never read)
#   .gpu_data/  the Multi30k jsonl files, gzipped (data is never committed: both folders are
#               in .gitignore); gpu_recipe.sh unpacks them
# The device tool carries at most 64 MiB of working tree per call: this checks the total.
#
# Then, through the device tool: run `bash scripts/gpu_checks.sh` with carry [".whl", ".gpu_data"].
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
# requests, tqdm, pyyaml, huggingface-hub) are in the GPU image
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
# what a call carries: the tracked and untracked-but-not-ignored files, plus these two folders
size() { xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s + 0 }'; }  # files gone: skipped
tree=$(git ls-files -z --cached --others --exclude-standard | size)
extra=$(find .whl .gpu_data -type f -print0 | size)
total=$((tree + extra))
echo "gpu_bundle: a call carrying .whl and .gpu_data moves $((total / 1048576)) MiB (limit 64 MiB)"
[ "$total" -lt $((62 * 1048576)) ] || { echo "gpu_bundle: over the device tool's 64 MiB (less a margin)" >&2; exit 1; }
