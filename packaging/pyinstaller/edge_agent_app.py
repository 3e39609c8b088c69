"""The one-file app's entry point: no arguments (a double-click) starts desktop mode
(edge_agent/desktop.py); with arguments it is the `edge-agent` command line."""

import sys


def main() -> None:
    # macOS Finder used to pass a process serial number (-psn_0_1234) on a double-click
    args = [a for a in sys.argv[1:] if not a.startswith("-psn_")]
    if not args:
        from edge_agent.desktop import main as desktop

        sys.exit(desktop())
    from edge_agent.cli import app

    sys.argv[1:] = args
    app(prog_name="edge-agent")


if __name__ == "__main__":
    main()
