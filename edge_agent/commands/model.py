"""`edge-agent model info|split`: inspect GGUF models and cut them into layer shards."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from edge_agent.options import JsonOpt

model_app = typer.Typer(help="Inspect GGUF models and cut them into layer shards.", no_args_is_help=True)

INFO_KEYS = ("path", "name", "arch", "role", "layer_range", "n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab",
             "context_length", "file_size", "tensor_types", "model_hash", "shard_hash", "source_model_hash")


@model_app.command("info")
def model_info(model: Path = typer.Argument(..., help="GGUF file."), as_json: bool = JsonOpt) -> None:
    """Architecture, layers, dimensions, heads, quant types, size and content hash of a GGUF."""
    from edge_agent import progress
    from edge_agent.runtime.shards import inspect_model

    progress.set_quiet(as_json)
    with progress.activity(f"reading {model.name} (hashing its tensors)"):
        d = inspect_model(model).to_dict()  # missing or corrupt: one line + hint (cli_errors)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    for key in INFO_KEYS:
        if d.get(key) not in (None, ""):
            typer.echo(f"{key:18} {d[key]}")


@model_app.command("split")
def model_split(
    model: Path = typer.Argument(..., help="Source GGUF (a whole model)."),
    layers: str = typer.Option(..., "--layers", "-l", help="Layer range A:B (B exclusive). 0:K is a head shard, L-M:L a tail."),
    out: Path = typer.Option(..., "--out", "-o", help="Output GGUF."),
    as_json: bool = JsonOpt,
) -> None:
    """Write decoder layers [A, B) as a standalone shard GGUF (tensor bytes unchanged)."""
    from edge_agent import progress
    from edge_agent.runtime.shards import inspect_model, parse_range, validate_range, write_shard

    progress.set_quiet(as_json)
    start, end = parse_range(layers)
    with progress.activity(f"reading {model.name}"):
        source = inspect_model(model)
    validate_range(start, end, source.n_layer)
    expected = int(source.file_size * (end - start) / max(1, source.n_layer))  # an estimate: the bar only shows it
    with progress.file_growth(out.with_name(out.name + "*.partial"), expected, f"layers {start}:{end}"):
        info = write_shard(model, out, start, end)
    if as_json:
        typer.echo(json.dumps({"out": str(out), **info.to_dict()}, indent=2))
    else:
        typer.echo(f"wrote {out} ({info.role} shard, layers {start}:{end}, {info.file_size / 1e6:.1f} MB, "
                   f"shard hash {info.shard_hash[:16]}...)")
