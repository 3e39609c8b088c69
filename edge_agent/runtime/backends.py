"""Pick and load an engine backend by name: the one place that knows all backends."""

from __future__ import annotations

from pathlib import Path

from edge_agent.runtime.engine import EngineError, EngineOptions

BACKENDS = ("llamacpp", "onnx", "auto")


def load_engine(backend: str, model_path: Path | str, start: int, end: int, options: EngineOptions | None = None, cache_dir=None):
    """Load layers [start, end) of ``model_path`` on ``backend`` ("auto" prefers llama.cpp)."""
    if backend in ("llamacpp", "auto"):
        from edge_agent.runtime.llamacpp import LlamaCppEngine

        return LlamaCppEngine.from_model(model_path, start, end, options, cache_dir)
    if backend == "onnx":
        try:
            from edge_agent.runtime.onnx import OnnxEngine
        except ImportError as exc:
            raise EngineError(f"the ONNX backend needs onnx and onnxruntime: pip install 'edge-agent[onnx]' ({exc})") from exc
        return OnnxEngine.from_model(model_path, start, end, options, cache_dir)
    raise EngineError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
