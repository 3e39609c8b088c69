"""``edge-agent doctor``: what this machine can do, in one screen."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path

DEPENDENCIES = ("llama_cpp", "numpy", "gguf", "typer", "nacl", "cryptography", "zeroconf", "aiortc", "aiohttp", "psutil", "onnx", "onnxruntime")


def _cpu_flags() -> list[str]:
    wanted = ("avx", "avx2", "avx512f", "fma", "f16c", "neon", "asimd", "sve", "amx_tile")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    return [f for f in wanted if f in flags]


def _imports() -> dict[str, str]:
    out = {}
    for name in DEPENDENCIES:
        try:
            mod = importlib.import_module(name)
            out[name] = str(getattr(mod, "__version__", "ok"))
        except Exception as exc:  # report, never crash: that is the point of doctor
            out[name] = f"MISSING ({type(exc).__name__}: {exc})"
    return out


def _llama_system_info() -> dict:
    try:
        import llama_cpp as lc

        info = lc.llama_print_system_info().decode("utf-8", "replace")
        return {"system_info": info.strip(), "gpu_offload": bool(lc.llama_supports_gpu_offload())}
    except Exception as exc:
        return {"error": str(exc)}


def node_memory(data_dir_override, model, layers: str | None, n_ctx: int, max_requests: int,
                max_memory_mb: float | None) -> dict:
    """What `join` with these settings would hold (edge_agent/sizing.py), or the reason it cannot say."""
    from edge_agent import sizing
    from edge_agent.config import ModelNotFoundError, resolve_model
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import inspect_model, parse_range, validate_range

    try:
        path = resolve_model(model, data_dir_override)
        info = inspect_model(path, with_hash=False)
        if layers:
            a, b = parse_range(layers)
            validate_range(a, b, info.n_layer)
            n = b - a
            if max_memory_mb is not None:
                max_requests = sizing.requests_that_fit(info, n, n_ctx, max_requests, max_memory_mb)
        else:
            n = info.n_layer if max_memory_mb is None else sizing.layers_that_fit(info, n_ctx, max_requests, max_memory_mb)
    except (ModelNotFoundError, EngineError, FileNotFoundError, sizing.MemoryBoundError) as exc:
        return {"error": str(exc)}
    return {"model": str(path), "max_memory_mb": max_memory_mb, **sizing.estimate(info, n, n_ctx, max_requests).to_dict()}


def collect(data_dir_override=None, *, model=None, layers: str | None = None, n_ctx: int = 2048, max_requests: int = 2,
            max_memory_mb: float | None = None) -> dict:
    from edge_agent import __version__
    from edge_agent.config import ModelNotFoundError, data_dir, resolve_model
    from edge_agent.runtime.llamacpp import default_threads

    try:
        model = str(resolve_model(None, data_dir_override))
    except ModelNotFoundError as exc:
        model = f"none: {exc}"
    try:
        import psutil

        mem = psutil.virtual_memory()
        memory = {"total_mb": mem.total // 2**20, "available_mb": mem.available // 2**20}
    except Exception:
        memory = {}
    return {
        "edge_agent": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": default_threads(),
        "cpu_features": _cpu_flags(),
        "memory": memory,
        "data_dir": str(data_dir(data_dir_override)),
        "default_model": model,
        "llama_cpp": _llama_system_info(),
        "node_memory": node_memory(data_dir_override, model, layers, n_ctx, max_requests, max_memory_mb),
        "dependencies": _imports(),
    }


def _render_node(node: dict) -> str:
    if "error" in node:
        return f"unknown: {node['error']}"
    return (f"~{node['total_mb']:.0f} MB for join with {node['layers']} layers x {node['max_requests']} requests x "
            f"{node['n_ctx']} positions (runtime {node['runtime_mb']:.0f}, weights {node['weights_mb']:.0f}, "
            f"KV cache {node['kv_mb']:.0f})")


def render(report: dict) -> str:
    lines = [
        f"edge-agent     {report['edge_agent']}  (python {report['python']}, {report['platform']})",
        f"cpu            {report['cpu_count']} cores, {report['threads']} threads used; features: {' '.join(report['cpu_features']) or '?'}",
        f"memory         {report['memory'].get('available_mb', '?')} MB free of {report['memory'].get('total_mb', '?')} MB",
        f"data dir       {report['data_dir']}",
        f"default model  {report['default_model']}",
        f"node memory    {_render_node(report['node_memory'])}",
        f"llama.cpp      gpu offload: {report['llama_cpp'].get('gpu_offload')}; {report['llama_cpp'].get('system_info', report['llama_cpp'].get('error', ''))}",
        "dependencies:",
    ]
    for name, status in report["dependencies"].items():
        lines.append(f"  {name:14} {status}")
    return "\n".join(lines)
