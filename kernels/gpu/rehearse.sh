#!/usr/bin/env bash
# Rehearse the GPU check here, without a GPU: a fresh virtual environment holding the GPU machine's versions that
# matter (triton 3.6, transformers 5.17, accelerate 1.15, huggingface-hub 1.33, tokenizers 0.23, and the nearest
# torch this machine has), plus only the wheels of .whl/ (from fetch.sh), installed by check.sh itself with
# --no-index --no-deps; then `check.sh --dry-run` (Triton's interpreter, smoke sizes, every stage end to end).
# It fails on a missing wheel, a missing import or an API that differs on those versions.
#   bash kernels/gpu/rehearse.sh [OUT_DIR]        # default OUT_DIR: /tmp/dtune-rehearsal
# The venv: ~/.cache/dtune/rehearsal-venv-<hash of Python and DEVICE_PACKAGES> (DTUNE_REHEARSAL_VENV overrides).
# Deviations from the GPU machine, forced by what installs here: Python 3.11 (this machine's torch build is for
# 3.11; a 3.12 torch from PyPI is a multi-GB CUDA build), so the two wheels of .whl/ built for one Python version
# (pydantic-core, multiprocess) are replaced by the same versions built for 3.11; every other wheel is the one
# carried. NumPy < 2.4 (the GPU machine has 2.5.2): Triton 3.6's interpreter cannot run under NumPy >= 2.4, and the
# GPU machine never interprets (dtune.kernels.nf4._check_interpreter says so on such a pair).
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)
OUT="${1:-${TMPDIR:-/tmp}/dtune-rehearsal}"
PY="${PYTHON:-python3}"
[[ -d .whl ]] || bash kernels/gpu/fetch.sh

# The GPU machine's image (the device tool's KINDS.md, 2026-11): only what dtune uses.
DEVICE_PACKAGES=(
    "${DTUNE_REHEARSAL_TORCH:-torch==2.13.0}" triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 peft==0.21.2
    safetensors==0.8.0 huggingface-hub==1.33.0 tokenizers==0.23.2 "numpy<2.4" pandas pyarrow pytest pytest-xdist tqdm
    matplotlib psutil msgpack ninja einops py-cpuinfo nvidia-ml-py cloudpickle pyyaml requests xxhash fsspec jinja2
    sentencepiece
)
# The venv outlives the checkout: CI clones afresh, and building it took 55-95 s of the rehearsal on two cores. One
# venv per Python and package list, so that a changed list gets a fresh one holding nothing the list lacks; the
# pinned install and the removal of carried packages below still run every time (no-ops on a venv they made).
key=$( { "$PY" -c 'import sys; print(sys.version)'; printf '%s\n' "${DEVICE_PACKAGES[@]}"; } | sha1sum | cut -c1-12)
VENV="${DTUNE_REHEARSAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dtune/rehearsal-venv-$key}"
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9  # two rehearsals at once: one sets the venv up, the other waits
t0=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
"$VENV/bin/python" -m pip install -q "${DEVICE_PACKAGES[@]}"
echo "rehearsal venv ready in $(( $(date +%s) - t0 )) s: $("$VENV/bin/python" -c 'import torch, triton, transformers; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)')"

# Strict: what the GPU machine lacks must come from .whl alone, so remove any copy a device package pulled in here
# (not those carried only as a newer version of what the machine has: marked `upgrade` in wheels.txt).
mapfile -t carried < <(awk '!/^#/ && NF && $2 != "upgrade" {split($1, a, "=="); print a[1]}' kernels/gpu/wheels.txt)
"$VENV/bin/python" -m pip uninstall -q -y "${carried[@]}" 2>/dev/null || true
exec 9>&-

# The carried wheels, with the per-Python-version ones swapped for this Python's build of the same version.
WHEELS="$REPO/.rehearsal-wheels"
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
pyver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
for w in .whl/*.whl; do
    name=$(basename "$w")
    if [[ "$name" == *-cp312-* || "$name" == *-py312-* ]] && [[ "$pyver" != 312 ]]; then
        spec=$(echo "$name" | awk -F- '{print $1"=="$2}')
        "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$WHEELS" "$spec"
    else
        cp "$w" "$WHEELS/"
    fi
done
mkdir -p "$WHEELS/assets"
cp -r .whl/assets/. "$WHEELS/assets/"
DTUNE_WHEELS="$WHEELS" PYTHON="$VENV/bin/python" DTUNE_GPU_SITE="$REPO/.rehearsal-site" \
    bash kernels/gpu/check.sh "$OUT" --dry-run "${@:2}"
