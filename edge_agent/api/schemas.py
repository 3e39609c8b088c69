"""Request bodies of the OpenAI-compatible API (pydantic), errors in OpenAI's shape, response builders.

Request bodies are validated here and nowhere else: a body that does not fit becomes an
``ApiError`` (400) naming the field. Unknown fields are ignored, as OpenAI clients send
many (``user``, ``presence_penalty``, ...). Responses are plain dicts: they are built on
the streaming hot path, once per token.
"""

from __future__ import annotations

import json
import time
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4
MAX_BODY_BYTES = 4 * 1024 * 1024  # a prompt larger than this cannot fit any context anyway


class ApiError(Exception):
    """An error the client gets as ``{"error": {message, type, param, code}}`` with ``status``."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: str
    max_tokens: Optional[int] = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # extension (llama.cpp's server has it); 0 = off
    seed: Optional[int] = None
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    # extension: this request's privacy level; it may tighten the server's --privacy, never loosen it
    privacy: Optional[Literal["open", "trusted", "local"]] = None
    # OpenAI's processing tier: "flex" (slower, cheaper) marks a batch request (docs/api.md)
    service_tier: Optional[str] = None

    def batch(self) -> bool:
        """True for ``service_tier`` "flex": not latency-critical, so newcomers may be tried on it."""
        if self.service_tier in (None, "auto", "default"):
            return False
        if self.service_tier == "flex":
            return True
        raise ApiError(400, f"service_tier {self.service_tier!r} is not offered here: use \"flex\" for a batch request, "
                       "or \"auto\"/\"default\" (interactive)", param="service_tier", code="invalid_value")

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(400, f"stop takes at most {MAX_STOP_STRINGS} strings", param="stop")
        return tuple(s for s in stops if s)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = None

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[int]]
    max_tokens: Optional[int] = Field(16, ge=0)  # OpenAI's default for /v1/completions
    logprobs: Optional[int] = None
    echo: bool = False

    def token_limit(self) -> Optional[int]:
        return self.max_tokens


def parse_body(raw: bytes, model: type[_Body]) -> _Body:
    """Bytes (already bounded by MAX_BODY_BYTES) -> validated request, or ApiError(400) naming what is wrong."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ApiError(400, f"{param}: {err['msg']}{more}", param=param, code="invalid_value") from None


# -- responses -------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, rid: str, model: str, text: str, finish: str, use: dict, extension: dict) -> dict:
    """A whole (non-streamed) answer; ``kind`` is "chat" or "text"."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice], "usage": use,
            "x_edge_agent": extension}


def chunk_body(kind: str, rid: str, model: str, text: str | None, finish: str | None = None, *, role: bool = False,
               use: dict | None = None, extension: dict | None = None, choices: bool = True) -> dict:
    """One streamed event. The last one (``choices=False``) carries usage and the extension."""
    body: dict = {"id": rid, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
                  "created": int(time.time()), "model": model, "choices": []}
    if choices:
        if kind == "chat":
            delta: dict = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            body["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        else:
            body["choices"] = [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
    if use is not None:
        body["usage"] = use
    if extension is not None:
        body["x_edge_agent"] = extension
    return body


def sse(data: dict | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
