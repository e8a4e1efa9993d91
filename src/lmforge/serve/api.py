"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching engine.

Endpoints: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics, /tokenize,
/detokenize and the guide's /generate. Errors are OpenAI-shaped JSON
(`{"error": {"message", "type", "param", "code"}}`): bad input is a 4xx naming the field, never a
500 and never a stack trace. One ASGI middleware checks API keys (before the body is read), caps the
body size and counts responses by status for /metrics.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.engine import Event, QueueFull, Request, SamplingParams, TokenLogprob
from lmforge.serve.metrics import Metrics
from lmforge.serve.protocol import (ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest, Message,
                                    TokenizeRequest)

log = logging.getLogger("lmforge.serve")
PROTECTED = ("/v1/", "/generate", "/tokenize", "/detokenize")
# proxies (nginx) must pass each token on at once rather than buffer the stream
SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}
ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize", "/detokenize",
          "/generate"}


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


# ---- helpers -----------------------------------------------------------------------------------
def _engine(state: ServerState):
    if state.engine is None:
        if state.load_error:
            raise ApiError(503, f"the model failed to load: {state.load_error}", "server_error", code="load_failed")
        raise ApiError(503, "the model is still loading; retry when /health answers 200", "server_error",
                       code="model_loading")
    return state.engine


def _check_model(state: ServerState, name: str | None) -> str:
    if name is not None and name not in state.names:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves {', '.join(state.names)}.",
                       "NotFoundError", "model", "model_not_found")
    return name or state.names[0]


def _check_ids(state: ServerState, ids: list[int], param: str) -> list[int]:
    vocab = state.engine.runner.vocab_size
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param=param)
    return ids


def _check_length(state: ServerState, n_prompt: int, max_tokens: int, param: str) -> None:
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


def _chat_ids(state: ServerState, messages: list[Message], add_generation_prompt: bool) -> list[int]:
    try:
        ids = state.tokenizer.apply_chat_template(_message_dicts(messages), add_generation_prompt=add_generation_prompt,
                                                  tokenize=True, return_dict=False)
    except Exception as e:  # a template that rejects this conversation (roles, order) is the request's fault
        raise ApiError(400, f"the chat template rejected these messages: {str(e).splitlines()[0][:200]}",
                       param="messages") from e
    return list(ids)


def _params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=max(req.top_k, 0), n=req.n, seed=req.seed, stop=list(req.stop or []),
                          stop_token_ids=list(req.stop_token_ids or []), presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos)


class _Call:
    """The engine requests behind one HTTP call: one per prompt, events merged into one asyncio queue."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams):
        engine = _engine(state)
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.n, self.remaining = params.n, len(prompts) * params.n
        self.reqs = [Request(ids, params, self._sink(k), loop=loop, timeout=state.request_timeout)
                     for k, ids in enumerate(prompts)]
        try:
            for r in self.reqs:
                engine.submit(r)
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, str(e), "rate_limit_error", code="queue_full") from e
        except ValueError as e:
            self.cancel()
            raise ApiError(400, str(e), param="n") from e

    def _sink(self, k: int):
        return lambda ev: self.queue.put_nowait((k, ev))  # runs in the event loop's thread

    def cancel(self) -> None:
        for r in self.reqs:
            r.cancelled = True

    async def events(self, http: HTTPRequest | None = None):
        """(prompt index, Event) until every sequence finished; cancels the rest if the client goes away."""
        try:
            while self.remaining > 0:
                if http is None:
                    k, ev = await self.queue.get()
                else:  # a non-streaming client that disconnects is noticed within a second
                    try:
                        k, ev = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            return
                        continue
                if ev.finish_reason == "timeout":
                    raise ApiError(408, "the request took longer than the server's --request-timeout",
                                   "timeout_error", code="request_timeout")
                if ev.finish_reason == "abort":
                    raise ApiError(500, "the engine aborted this request; see the server log", "server_error")
                if ev.finish_reason is not None:
                    self.remaining -= 1
                yield k, ev
        finally:
            self.cancel()


def _tok_str(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id])


def _completion_logprobs(state: ServerState, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> dict:
    """OpenAI's completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in entries:
        s = _tok_str(state, token_id)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if e is None else e.logprob)
        out["top_logprobs"].append(None if e is None else {_tok_str(state, t): lp for t, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def _chat_logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict:
    def item(token_id, lp):
        s = _tok_str(state, token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(call: _Call, chunks, include_usage: bool, usage_chunk):
    """SSE body: one `data:` line per chunk, an error chunk if the call fails midway, then `data: [DONE]`."""
    completion_tokens = 0
    try:
        async for k, ev in call.events():
            completion_tokens += len(ev.token_ids)
            for chunk in chunks(k, ev):
                yield _sse(chunk)
        if include_usage:
            yield _sse(usage_chunk(completion_tokens))
    except ApiError as e:
        yield _sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
    yield "data: [DONE]\n\n"


# ---- the app -----------------------------------------------------------------------------------
def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return error_response(e.status, e.message, e.type, e.param, e.code)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _crash(_, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal server error; see the server log", "server_error")

    @app.get("/health")
    async def health():
        if state.engine is None:
            message = f"loading failed: {state.load_error}" if state.load_error else "loading"
            return JSONResponse({"status": message}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        engine = _engine(state)
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": state.created, "owned_by": "lmforge",
             "root": state.names[0], "max_model_len": engine.max_model_len} for name in state.names]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: HTTPRequest):
        _engine(state)
        model = _check_model(state, req.model)
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of must equal n (candidates are not ranked)", param="best_of")
        prompts = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else req.prompt
        ids = []
        for p in prompts:
            t = _check_ids(state, p, "prompt") if isinstance(p, list) else state.tokenizer(p).input_ids
            if not t:
                raise ApiError(400, "prompt is empty", param="prompt")
            ids.append(t)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        if max_tokens == 0 and not req.echo:
            raise ApiError(400, "max_tokens must be at least 1 unless echo is true", param="max_tokens")
        for t in ids:
            _check_length(state, len(t), max_tokens, "prompt")
        want_prompt_lp = req.echo and req.logprobs is not None
        params = _params(req, max_tokens, req.logprobs, req.logprobs if want_prompt_lp else None)
        call = _Call(state, ids, params)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        prompt_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
        offsets: dict[int, int] = {}

        def choice_logprobs(k: int, i: int, ev: Event) -> dict | None:
            if req.logprobs is None:
                return None
            entries = []
            if ev.prompt_logprobs is not None:
                entries += list(zip(ids[k], ev.prompt_logprobs))
            entries += [(e.token_id, e) for e in ev.logprobs]
            start = offsets.get(k * req.n + i, 0)
            out = _completion_logprobs(state, entries, start)
            offsets[k * req.n + i] = start + sum(len(s) for s in out["tokens"])
            return out

        started: set[tuple[int, int]] = set()

        def echoed(k: int, ev: Event) -> str:
            """The event's text, after the prompt's on the first event of each choice when echo is on."""
            first = req.echo and (k, ev.index) not in started
            started.add((k, ev.index))
            return (prompt_texts[k] if first else "") + ev.text

        if req.stream:
            def chunks(k, ev):
                text = echoed(k, ev)
                if text or ev.finish_reason or ev.logprobs:
                    yield {"id": rid, "object": "text_completion", "created": created, "model": model,
                           "choices": [{"index": k * req.n + ev.index, "text": text,
                                        "logprobs": choice_logprobs(k, ev.index, ev),
                                        "finish_reason": ev.finish_reason}]}

            usage = sum(map(len, ids))
            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(call, chunks, include, lambda c: {
                "id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                "usage": _usage(usage, c)}), media_type="text/event-stream", headers=SSE_HEADERS)

        choices: dict[int, dict] = {}
        completion_tokens = 0
        async for k, ev in call.events(http):
            c = choices.setdefault(k * req.n + ev.index, {"index": k * req.n + ev.index, "text": "", "logprobs": None,
                                                          "finish_reason": None})
            c["text"] += echoed(k, ev)
            lp = choice_logprobs(k, ev.index, ev)
            if lp is not None:
                if c["logprobs"] is None:
                    c["logprobs"] = lp
                else:
                    for key in lp:
                        c["logprobs"][key] += lp[key]
            c["finish_reason"] = ev.finish_reason or c["finish_reason"]
            completion_tokens += len(ev.token_ids)
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [choices[i] for i in sorted(choices)], "usage": _usage(sum(map(len, ids)), completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http: HTTPRequest):
        _engine(state)
        model = _check_model(state, req.model)
        ids = _chat_ids(state, req.messages, req.add_generation_prompt)
        max_tokens = req.max_completion_tokens or req.max_tokens
        if max_tokens is None:
            max_tokens = state.max_model_len - len(ids)
            if max_tokens < 1:
                _check_length(state, len(ids), 1, "messages")
        _check_length(state, len(ids), max_tokens, "messages")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        call = _Call(state, [ids], _params(req, max_tokens, logprobs, None))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

        if req.stream:
            started: set[int] = set()

            def chunks(_, ev):
                if ev.index not in started:
                    started.add(ev.index)
                    yield {**base, "choices": [{"index": ev.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}
                if ev.text or ev.finish_reason or ev.logprobs:
                    delta = {"content": ev.text} if ev.text else {}
                    yield {**base, "choices": [{"index": ev.index, "delta": delta,
                                                "logprobs": _chat_logprobs(state, ev.logprobs) if req.logprobs else None,
                                                "finish_reason": ev.finish_reason}]}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(call, chunks, include, lambda c: {**base, "choices": [],
                                                                               "usage": _usage(len(ids), c)}),
                                     media_type="text/event-stream", headers=SSE_HEADERS)

        choices: dict[int, dict] = {}
        completion_tokens = 0
        async for _, ev in call.events(http):
            c = choices.setdefault(ev.index, {"index": ev.index, "message": {"role": "assistant", "content": ""},
                                              "logprobs": {"content": []} if req.logprobs else None,
                                              "finish_reason": None})
            c["message"]["content"] += ev.text
            if req.logprobs:
                c["logprobs"]["content"] += _chat_logprobs(state, ev.logprobs)["content"]
            c["finish_reason"] = ev.finish_reason or c["finish_reason"]
            completion_tokens += len(ev.token_ids)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [choices[i] for i in sorted(choices)], "usage": _usage(len(ids), completion_tokens)}

    @app.post("/generate")
    async def generate(req: GenerateRequest, http: HTTPRequest):
        _engine(state)
        ids = state.tokenizer(req.prompt).input_ids
        _check_length(state, len(ids), req.max_tokens, "prompt")
        params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature)
        t0, text, n = time.perf_counter(), "", 0
        async for _, ev in _Call(state, [ids], params).events(http):
            text += ev.text
            n += len(ev.token_ids)
        return {"generated_text": text, "tokens_generated": n, "time_taken": round(time.perf_counter() - t0, 4)}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        engine = _engine(state)
        _check_model(state, req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "send exactly one of prompt and messages", param="prompt")
        if req.messages is not None:
            ids = _chat_ids(state, req.messages, req.add_generation_prompt)
        else:
            ids = state.tokenizer(req.prompt, add_special_tokens=req.add_special_tokens).input_ids
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        _engine(state)
        _check_model(state, req.model)
        return {"prompt": state.tokenizer.decode(_check_ids(state, req.tokens, "tokens"))}

    app.add_middleware(Gate, state=state)
    return app
