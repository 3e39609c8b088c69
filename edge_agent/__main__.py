from edge_agent.cli import app

app()
