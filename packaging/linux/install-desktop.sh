#!/usr/bin/env bash
# Put the one-file app on this Linux desktop, for this user: the binary in ~/.local/bin, the
# launcher (edge-agent.desktop) and its icon where desktop environments look (XDG paths).
# Usage: bash packaging/linux/install-desktop.sh [path/to/edge-agent]   (default: dist/edge-agent)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="${1:-$here/../../dist/edge-agent}"
if [ ! -x "$binary" ]; then
  echo "error: no executable at $binary: build it with 'bash packaging/pyinstaller/build.sh'" >&2
  exit 2
fi
data="${XDG_DATA_HOME:-$HOME/.local/share}"
install -D -m 0755 "$binary" "$HOME/.local/bin/edge-agent"
install -D -m 0644 "$here/edge-agent.svg" "$data/icons/hicolor/scalable/apps/edge-agent.svg"
mkdir -p "$data/applications"
# an absolute Exec= works even where ~/.local/bin is not on the desktop session's PATH
sed -e "s|^Exec=.*|Exec=$HOME/.local/bin/edge-agent|" -e "s|^TryExec=.*|TryExec=$HOME/.local/bin/edge-agent|" \
  "$here/edge-agent.desktop" > "$data/applications/edge-agent.desktop.tmp"
mv "$data/applications/edge-agent.desktop.tmp" "$data/applications/edge-agent.desktop"
command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database "$data/applications" || true
echo "installed: $HOME/.local/bin/edge-agent and the 'edge-agent' launcher in your applications menu"
