"""edge-agent: run one LLM together across independently owned devices, layer by layer."""

__version__ = "0.1.0"
