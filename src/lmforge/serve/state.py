"""What every handler shares: the server's state, OpenAI-shaped errors, and the checks a request passes first."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from lmforge import infer
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import Message


class ApiError(Exception):
    """An error the client caused (or may retry); becomes OpenAI-shaped JSON with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


@dataclass
class ServerState:
    """What the handlers share: the engine once loaded (None while loading), names, keys and limits."""
    names: list[str]
    metrics: Metrics
    api_keys: list[str] = field(default_factory=list)
    request_timeout: float | None = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    engine: object | None = None
    tokenizer: object | None = None
    load_error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len


def engine_of(state: ServerState):
    """The engine, or 503 while the model loads (or after it failed to)."""
    if state.engine is None:
        if state.load_error:
            raise ApiError(503, f"the model failed to load: {state.load_error}", "server_error", code="load_failed")
        raise ApiError(503, "the model is still loading; retry when /health answers 200", "server_error",
                       code="model_loading")
    return state.engine


def check_model(state: ServerState, name: str | None) -> str:
    if name is not None and name not in state.names:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves {', '.join(state.names)}.",
                       "NotFoundError", "model", "model_not_found")
    return name or state.names[0]


def check_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = state.engine.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    return ids


def check_length(state: ServerState, n_prompt: int, max_tokens: int, param: str) -> None:
    limit = state.max_model_len
    if n_prompt + max_tokens > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                            f"{n_prompt + max_tokens} tokens ({n_prompt} in the {param}, {max_tokens} in the "
                            f"completion). Please reduce the length of the {param} or completion.",
                       param=param, code="context_length_exceeded")


def _message_dicts(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        out.append({"role": m.role, "content": content or "", **({"name": m.name} if m.name else {})})
    return out


def chat_ids(state: ServerState, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    """The conversation's token ids as lmforge.infer renders every chat; 400 when the template rejects it."""
    try:
        return infer.chat_ids(state.tokenizer, _message_dicts(messages), add_generation_prompt)
    except Exception as e:  # a template that rejects this conversation (roles, order) is the request's fault
        raise ApiError(400, f"the chat template rejected these messages: {str(e).splitlines()[0][:200]}",
                       param="messages") from e
