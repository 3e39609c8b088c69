"""The `edge-agent` commands, one module per group (registered by edge_agent/cli.py); each
module imports only typer at the top, the heavy libraries inside the command that needs them."""
