"""What a node serving layers will hold in memory, and the settings that fit ``--max-memory``.

A node's resident memory is, measured (docs/benchmarks.md, "Node memory"):
  runtime (Python, llama.cpp, the transport libraries, compute buffers) ~ RUNTIME_MB
  + weights of its layers        (file size / layers, each: an upper bound, the embedding is counted in)
  + KV cache                     (layers x requests x ``node.kv_mb_per_layer``: allocated at start)
so ``estimate`` is a bound, measured within ~10 % above the real RSS. No I/O here: the model's
header (``runtime.shards.ModelInfo``) comes from the caller.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# measured: a node serving 1 layer of SmolLM2-135M with 2 requests holds 171 MB (x86-64, Python 3.11)
RUNTIME_MB = 170.0


class MemoryBoundError(ValueError):
    """``--max-memory`` leaves no room for one request on one layer."""


@dataclass(frozen=True)
class NodeMemory:
    layers: int
    max_requests: int
    n_ctx: int
    runtime_mb: float
    weights_mb: float
    kv_mb: float

    @property
    def total_mb(self) -> float:
        return self.runtime_mb + self.weights_mb + self.kv_mb

    def to_dict(self) -> dict:
        return {**{k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()},
                "total_mb": round(self.total_mb, 1)}


def layer_weights_mb(info) -> float:
    return info.file_size / 1e6 / max(1, info.n_layer)


def kv_mb_per_layer(info, n_ctx: int) -> float:
    """One layer of one request (the planner's figure, from node.kv_mb_per_layer)."""
    from edge_agent.node import kv_mb_per_layer as per_layer
    from edge_agent.runtime.engine import EngineOptions

    return per_layer(info, EngineOptions(n_ctx_per_request=n_ctx))


def estimate(info, layers: int, n_ctx: int, max_requests: int) -> NodeMemory:
    return NodeMemory(layers, max_requests, n_ctx, RUNTIME_MB, layers * layer_weights_mb(info),
                      layers * max_requests * kv_mb_per_layer(info, n_ctx))


def requests_that_fit(info, layers: int, n_ctx: int, wanted: int, budget_mb: float) -> int:
    """The most requests (<= ``wanted``) whose KV fits ``budget_mb`` beside runtime and weights."""
    base = estimate(info, layers, n_ctx, 0)
    per_request = layers * kv_mb_per_layer(info, n_ctx)
    fit = min(wanted, int((budget_mb - base.total_mb) // per_request))
    if fit < 1:
        one = estimate(info, layers, n_ctx, 1)
        raise MemoryBoundError(f"--max-memory {budget_mb:.0f}M is below what {layers} layers need: ~{one.total_mb:.0f} MB "
                               f"(runtime {one.runtime_mb:.0f}, weights {one.weights_mb:.0f}, KV of one request "
                               f"{one.kv_mb:.0f})")
    return fit


def layers_that_fit(info, n_ctx: int, max_requests: int, budget_mb: float) -> int:
    """The most layers whose weights and KV for ``max_requests`` fit ``budget_mb`` beside the runtime."""
    per_layer = layer_weights_mb(info) + max_requests * kv_mb_per_layer(info, n_ctx)
    fit = min(info.n_layer, int((budget_mb - RUNTIME_MB) // per_layer))
    if fit < 1:
        raise MemoryBoundError(f"--max-memory {budget_mb:.0f}M is below what one layer needs: ~{RUNTIME_MB + per_layer:.0f} MB "
                               f"(runtime {RUNTIME_MB:.0f}, a layer's weights and KV for {max_requests} requests "
                               f"{per_layer:.0f})")
    return fit
