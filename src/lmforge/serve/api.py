"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Endpoints: /v1/completions and /v1/chat/completions (serve/completions.py), /v1/models, /health,
/metrics, /tokenize, /detokenize and the guide's /generate. Errors are OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`): bad input is a 4xx naming the field, never a
500 and never a stack trace. One ASGI middleware checks API keys (before the body is read), caps the
body size and counts responses by status for /metrics.
"""
from __future__ import annotations

import hmac
import logging
import time

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.infer import SamplingParams
from lmforge.serve.completions import Call, chat_completions, completions
from lmforge.serve.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest
from lmforge.serve.state import (ApiError, ServerState, chat_ids, check_ids, check_length, check_model, engine_of,
                                 error_response)

log = logging.getLogger("lmforge.serve")
PROTECTED = ("/v1/", "/generate", "/tokenize", "/detokenize")
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/generate"}


# ---- middleware --------------------------------------------------------------------------------
def _authorized(keys: list[str], header: bytes | None) -> bool:
    if not header or not header.startswith(b"Bearer "):
        return False
    given = header[len(b"Bearer "):].strip()
    ok = False
    for k in keys:  # compare with every key, constant time each: no early exit that leaks which matched
        ok |= hmac.compare_digest(given, k.encode())
    return ok


class Gate:
    """ASGI middleware: API keys, body-size cap, and the HTTP status counter."""

    def __init__(self, app, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = {"code": 499}  # nginx's "client closed request": it went away before any answer started

        async def send_and_count(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_and_count, path)
        except Exception:  # answered 500 by Starlette's outermost error middleware
            status["code"] = 500
            raise
        finally:
            handler = path if path in ROUTES else "other"
            self.state.metrics.http.labels(handler=handler, method=scope["method"], status=str(status["code"])).inc()

    async def _handle(self, scope, receive, send, path):
        headers = dict(scope["headers"])
        if self.state.api_keys and path.startswith(PROTECTED) and not _authorized(
                self.state.api_keys, headers.get(b"authorization")):
            resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                  "authentication_error", code="invalid_api_key")
            return await resp(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        cap = self.state.max_body_bytes
        too_big = error_response(413, f"Request body is larger than the server's limit of {cap} bytes.",
                                 code="request_too_large")
        try:
            if int(headers.get(b"content-length", b"0")) > cap:
                return await too_big(scope, receive, send)
        except ValueError:
            return await error_response(400, "Invalid Content-Length header.")(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# ---- errors ------------------------------------------------------------------------------------
async def _api_error(_, e: ApiError):
    return error_response(e.status, e.message, e.type, e.param, e.code)


async def _invalid(_, e: RequestValidationError):
    err = e.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif err.get("type") == "json_invalid":
        message, param = f"The request body is not valid JSON: {err.get('ctx', {}).get('error', '')}", None
    else:
        message = f"{param}: {err.get('msg')}" if param else f"request body: {err.get('msg')}"
    return error_response(400, message, param=param)


async def _http(_, e: StarletteHTTPException):
    return error_response(e.status_code, str(e.detail), "invalid_request_error")


async def _crash(_, e: Exception):
    log.exception("unhandled error")
    return error_response(500, "internal server error; see the server log", "server_error")


# ---- the small endpoints ---------------------------------------------------------------------------
def _state(http: HTTPRequest) -> ServerState:
    return http.app.state.lmforge


async def health(http: HTTPRequest):
    state = _state(http)
    if state.engine is None:
        message = f"loading failed: {state.load_error}" if state.load_error else "loading"
        return JSONResponse({"status": message}, status_code=503)
    return {"status": "ok"}


async def metrics(http: HTTPRequest):
    return Response(generate_latest(_state(http).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def models(http: HTTPRequest):
    state = _state(http)
    engine = engine_of(state)
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": state.created, "owned_by": "lmforge",
         "root": state.names[0], "max_model_len": engine.max_model_len} for name in state.names]}


async def generate(req: GenerateRequest, http: HTTPRequest):
    state = _state(http)
    engine_of(state)
    ids = state.tokenizer(req.prompt).input_ids
    check_length(state, len(ids), req.max_tokens, "prompt")
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature)
    t0, text, n = time.perf_counter(), "", 0
    async for _, ev in Call(state, [ids], params).events(http):
        text += ev.text
        n += len(ev.token_ids)
    return {"generated_text": text, "tokens_generated": n, "time_taken": round(time.perf_counter() - t0, 4)}


async def tokenize(req: TokenizeRequest, http: HTTPRequest):
    state = _state(http)
    engine = engine_of(state)
    check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "send exactly one of prompt and messages", param="prompt")
    if req.messages is not None:
        ids = chat_ids(state, req.messages, req.add_generation_prompt)
    else:
        ids = state.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}


async def detokenize(req: DetokenizeRequest, http: HTTPRequest):
    state = _state(http)
    engine_of(state)
    check_model(state, req.model)
    return {"prompt": state.tokenizer.decode(check_ids(state, req.tokens, "tokens"))}


# ---- the app -----------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    """The app: every route above, the error handlers, and the Gate middleware, sharing `state`."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    for error, handler in ((ApiError, _api_error), (RequestValidationError, _invalid),
                           (StarletteHTTPException, _http), (Exception, _crash)):
        app.add_exception_handler(error, handler)
    for path, handler, method in (("/health", health, "GET"), ("/metrics", metrics, "GET"),
                                  ("/v1/models", models, "GET"), ("/v1/completions", completions, "POST"),
                                  ("/v1/chat/completions", chat_completions, "POST"), ("/generate", generate, "POST"),
                                  ("/tokenize", tokenize, "POST"), ("/detokenize", detokenize, "POST")):
        app.add_api_route(path, handler, methods=[method])
    app.add_middleware(Gate, state=state)
    return app
