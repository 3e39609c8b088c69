"""What the client tells about a request: the stats of its result (``request_stats``), and why
no path exists when a peer could have served the layers (``explain_no_route``)."""

from __future__ import annotations

from edge_agent.split.local import LOCAL_PEER_ID
from edge_agent.split.peersource import PeerSource
from edge_agent.split.planner import NoRouteError, format_layers
from edge_agent.split.policy import PrivacyPolicy
from edge_agent.split.strategy import RequestState


def request_stats(req: RequestState, local: list) -> dict:
    """``GenerationResult.stats`` of a request; ``local``: the ``info`` of this device's engines (head, tail)."""
    tel = req.tracker.telemetry()
    return {
        "request_id": req.rid.hex(),  # as in the ledger (`edge-agent ledger show --request`)
        "mode": req.plan.mode,
        "path": [{"peer_id": h.hop.peer_id, "range": f"{h.hop.start}:{h.hop.end}"} for h in req.hops],
        "hops": [
            {"peer_id": h.hop.peer_id, "range": f"{h.hop.start}:{h.hop.end}", "steps": h.steps,
             "compute_ms": round(h.compute_ms, 3), "transfer_ms": round(h.transfer_ms, 3),
             "budget_ms": round(h.hop.budget_ms, 3)}
            for h in req.hops
        ],
        "slack_ms": round(tel.budget_ms - tel.mean_total_ms, 3) if tel.mean_total_ms is not None else None,
        "deadline_misses": tel.step_misses,
        "chain_ms": round(req.chain_ms, 3),
        "reroutes": req.reroutes,
        "local": [f"{info.start}:{info.end}" for info in local],
        "privacy": {"policy": req.policy.name, "k": req.policy.k, "m": req.policy.m,
                    "peers_saw_activations": sorted(({h.hop.peer_id for h in req.hops} | {r["from"] for r in req.reroutes}
                                                     | {p for r in req.reroutes for p in r["to"]}) - {LOCAL_PEER_ID, None})},
    }


def explain_no_route(exc: NoRouteError, policy: PrivacyPolicy, peers: PeerSource) -> NoRouteError:
    """Name the settings that kept a peer off the path, when one could have served the layers."""
    if policy.strict:  # never weakened: say which layers no trusted peer holds, and who else does
        others = sorted({c.peer_id[:12] for c in peers.capabilities() if not policy.admits(c.peer_id)
                         and any(a < e and s < b for a, b in c.ranges for s, e in exc.missing)})
        held = f"untrusted peers serve them: {', '.join(others)}; " if others else ""
        return NoRouteError(exc.missing, f"privacy policy {policy.name!r}: {held}trust a peer with "
                            "`edge-agent trust add ID`, or run with --privacy local", what="no trusted peer holds")
    reasons = [f"peer {p.peer_id[:12]} ({', '.join(format_layers(r) for r in p.ranges)}): {p.reason}"
               for p in peers.incompatible()
               if any(a < e and s < b for a, b in p.ranges for s, e in exc.missing)]
    if not reasons:
        return exc
    hint = " (match them with --flash-attn/--no-flash-attn, --ubatch, --backend)" if any(
        "reputation" not in r for r in reasons) else ""
    return NoRouteError(exc.missing, "only peers this client does not route to serve them: " + "; ".join(reasons) + hint)
