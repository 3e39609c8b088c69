"""The OpenAI-compatible HTTP API (Starlette): chat and text completions, models, health, metrics.

Every error leaves as ``{"error": {...}}`` with its status (``schemas.ApiError``); nothing
reaches the client as a traceback. A streamed answer waits for its first token before
sending headers, so failures before any output (no route, context too small) keep their
HTTP status; later ones become a final ``error`` event.
"""

from __future__ import annotations

import hmac
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge_agent.api.engine import ApiEngine, ClientGone, StopHoldback, Token, extension
from edge_agent.api.metrics import ApiMetrics
from edge_agent.api.schemas import (MAX_BODY_BYTES, ApiError, ChatRequest, CompletionRequest, chunk_body, completion_body,
                                    parse_body, sse, usage)
from edge_agent.runtime.generation import GenerationResult
from edge_agent.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from edge_agent.api.accounts_panel import AccountsPanel

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/metrics", "/")  # and /static/*: no API key needed, nothing private there


@dataclass
class ApiServices:
    """What the routes use; ``serve`` wires it from a running agent (or a test from anything)."""

    engine: ApiEngine
    metrics: ApiMetrics
    model_id: str
    n_ctx: int
    swarm: Callable[[], dict]  # model, layers, local ranges and live peers (see server.swarm_view)
    api_key: str | None = None
    created: int = int(time.time())
    accounts: "AccountsPanel | None" = None  # the dashboard's ledger view; None: this agent keeps no ledger


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def as_api_error(exc: BaseException) -> ApiError:
    """The swarm's failures in OpenAI's error shape, with the status a client can act on."""
    from edge_agent.runtime.engine import CapacityError, EngineError
    from edge_agent.split.protocol import HopFailed
    from edge_agent.split.planner import NoRouteError, format_layers

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, NoRouteError):
        missing = [format_layers(r) for r in exc.missing]
        return ApiError(503, f"no route through the swarm: {exc}", "server_error", code="no_route",
                        param=", ".join(missing) or None)
    if isinstance(exc, CapacityError):
        return ApiError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, HopFailed):
        return ApiError(502, f"a peer failed and no replacement was found: {exc}", "server_error", code="hop_failed")
    if isinstance(exc, (EngineError, ValueError)):
        return ApiError(400, str(exc), code="invalid_value")
    log.exception("request failed")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}"[:500], "server_error", code="internal_error")


async def read_body(request: Request) -> bytes:
    """The body, refused (413) before it outgrows MAX_BODY_BYTES: a client cannot fill our memory."""
    too_big = ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
            raise too_big
    except ValueError:
        raise ApiError(400, "bad Content-Length header", code="invalid_value") from None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise too_big
        parts.append(part)
    return b"".join(parts)


class _ApiKeyMiddleware:
    """Bearer-token check (constant-time) on everything but the open paths."""

    def __init__(self, app, api_key: str | None):
        self.app, self.key = app, (api_key or "").encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.key or path in OPEN_PATHS or path.startswith("/static/"):
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        token = header[7:] if header[:7].lower() == b"bearer " else b""
        if not hmac.compare_digest(token, self.key):
            err = ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key")
            return await error_response(err)(scope, receive, send)
        return await self.app(scope, receive, send)


def _sampling(s: ApiServices, body, n_prompt: int) -> SamplingParams:
    if body.model != s.model_id:
        raise ApiError(404, f"model {body.model!r} is not served here; GET /v1/models lists {s.model_id!r}",
                       param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    if body.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs", code="invalid_value")
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    if n_prompt >= s.n_ctx:
        raise ApiError(400, f"the prompt has {n_prompt} tokens; the context holds {s.n_ctx}", param="messages",
                       code="context_length_exceeded")
    limit = body.token_limit()
    room = s.n_ctx - n_prompt
    if limit is not None and limit > room:
        raise ApiError(400, f"max_tokens {limit} + {n_prompt} prompt tokens exceed the context of {s.n_ctx}",
                       param="max_tokens", code="context_length_exceeded")
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, seed=body.seed,
                          max_tokens=room if limit is None else limit, stop=body.stop_strings())


async def _answer(s: ApiServices, kind: str, body, prompt: list[int]) -> Response:
    params = _sampling(s, body, len(prompt))
    flight = s.engine.start(kind, prompt, params, privacy=body.privacy, batch=body.batch())
    events = flight.events()
    try:
        first = await anext(events)
    except Exception as exc:  # noqa: BLE001 - mapped to an error body
        await events.aclose()
        raise as_api_error(exc) from None
    if not body.stream:
        async with aclosing(events):
            item = first
            while not isinstance(item, GenerationResult):
                item = await anext(events)
        use = usage(item.prompt_tokens, len(item.token_ids))
        return JSONResponse(completion_body(kind, flight.id, s.model_id, item.text, item.finish_reason, use,
                                            extension(item.stats, flight)))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def stream():
        hold = StopHoldback(params.stop)
        item = first
        role = kind == "chat"  # the role rides on the first chunk: one write less before the first token
        try:
            while isinstance(item, Token):
                text = hold.push(item.text)
                if text:
                    yield sse(chunk_body(kind, flight.id, s.model_id, text, role=role))
                    role = False
                item = await anext(events)
            yield sse(chunk_body(kind, flight.id, s.model_id, hold.finish(item.text), item.finish_reason, role=role))
            yield sse(chunk_body(kind, flight.id, s.model_id, None, choices=False, extension=extension(item.stats, flight),
                                 use=usage(item.prompt_tokens, len(item.token_ids)) if include_usage else None))
            yield sse("[DONE]")
        except ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(as_api_error(exc).body())
        finally:
            flight.cancel()  # a no-op once finished; else the hops end the request at the next token

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(s: ApiServices, extra_routes: list | None = None) -> Starlette:
    async def chat(request: Request) -> Response:
        body = parse_body(await read_body(request), ChatRequest)
        tok = s.engine.tokenizer
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(messages)
        except Exception as exc:  # noqa: BLE001 - a template error is the request's problem
            raise ApiError(400, f"chat template: {exc}", param="messages", code="invalid_value") from None
        return await _answer(s, "chat", body, tok.encode(text, add_special=True, parse_special=True))

    async def completions(request: Request) -> Response:
        body = parse_body(await read_body(request), CompletionRequest)
        if body.echo:
            raise ApiError(400, "echo is not supported", param="echo", code="invalid_value")
        tok = s.engine.tokenizer
        if isinstance(body.prompt, str):
            prompt = tok.encode(body.prompt)
        else:
            prompt = list(body.prompt)
            if any(not 0 <= t < tok.n_vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {tok.n_vocab})", param="prompt", code="invalid_value")
        return await _answer(s, "text", body, prompt)

    async def models(_request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": s.created,
                                                          "owned_by": "edge-agent"}]})

    async def health(_request: Request) -> Response:
        view = s.swarm()
        return JSONResponse({"status": "ok", "model": s.model_id, "peers": len(view["peers"]), "covered": view["covered"],
                             "requests_in_flight": len(s.engine.flights)})

    async def metrics(_request: Request) -> Response:
        return Response(s.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def api_error(_request: Request, exc: ApiError) -> Response:
        return error_response(exc)

    async def http_error(_request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None))

    async def crash(_request: Request, exc: Exception) -> Response:
        return error_response(as_api_error(exc))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *(extra_routes or []),
    ]
    return Starlette(routes=routes, middleware=[Middleware(_ApiKeyMiddleware, api_key=s.api_key)],
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: crash})
