#!/usr/bin/env bash
# Build dist/edge-agent: one executable (PyInstaller --onefile, packaging/pyinstaller/edge-agent.spec).
# Needs the install (scripts/install.sh); adds PyInstaller to .venv through the [app] extra.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ ! -x .venv/bin/python ]; then
  echo "error: no .venv here: run 'bash scripts/install.sh' first" >&2
  exit 2
fi
.venv/bin/python -m pip install --quiet -e ".[app]"
start=$(date +%s)
.venv/bin/python -m PyInstaller --noconfirm --log-level WARN --distpath dist --workpath build/pyinstaller \
  packaging/pyinstaller/edge-agent.spec
echo "built dist/edge-agent ($(du -m dist/edge-agent | cut -f1) MB) in $(( $(date +%s) - start )) s"
