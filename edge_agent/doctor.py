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


def collect(data_dir_override=None) -> dict:
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
        "dependencies": _imports(),
    }


def render(report: dict) -> str:
    lines = [
        f"edge-agent     {report['edge_agent']}  (python {report['python']}, {report['platform']})",
        f"cpu            {report['cpu_count']} cores, {report['threads']} threads used; features: {' '.join(report['cpu_features']) or '?'}",
        f"memory         {report['memory'].get('available_mb', '?')} MB free of {report['memory'].get('total_mb', '?')} MB",
        f"data dir       {report['data_dir']}",
        f"default model  {report['default_model']}",
        f"llama.cpp      gpu offload: {report['llama_cpp'].get('gpu_offload')}; {report['llama_cpp'].get('system_info', report['llama_cpp'].get('error', ''))}",
        "dependencies:",
    ]
    for name, status in report["dependencies"].items():
        lines.append(f"  {name:14} {status}")
    return "\n".join(lines)
