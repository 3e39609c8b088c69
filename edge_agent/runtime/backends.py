"""Pick and load an engine backend by name: the one place that knows all backends."""

from __future__ import annotations

from pathlib import Path

from edge_agent.runtime.engine import EngineError, EngineOptions

BACKENDS = ("llamacpp", "onnx", "auto")


def resolve_backend(backend: str) -> str:
    """The engine kind a backend name loads ("auto" is llama.cpp): what ``Arithmetic.backend`` holds."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return "llamacpp" if backend == "auto" else backend


def load_engine(backend: str, model_path: Path | str, start: int, end: int, options: EngineOptions | None = None, cache_dir=None):
    """Load layers [start, end) of ``model_path`` on ``backend`` ("auto" prefers llama.cpp)."""
    backend = resolve_backend(backend)
    if backend == "llamacpp":
        from edge_agent.runtime.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_model(model_path, start, end, options, cache_dir)
    try:
        from edge_agent.runtime.onnx import OnnxEngine
    except ImportError as exc:
        raise EngineError(f"the ONNX backend needs onnx and onnxruntime: pip install 'edge-agent[onnx]' ({exc})") from exc
    return OnnxEngine.from_model(model_path, start, end, options, cache_dir)
