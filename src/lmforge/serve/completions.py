"""The OpenAI generation endpoints, /v1/completions and /v1/chat/completions, over the engine.

One HTTP call becomes one engine request per prompt; their events come back through one asyncio
queue, and are either streamed as Server-Sent Events (one `data:` chunk per event, then `data:
[DONE]`) or gathered into one response. A client that disconnects is cancelled at the next step.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from lmforge.infer import Event, QueueFull, Request, SamplingParams, TokenLogprob
from lmforge.serve.protocol import ChatRequest, CompletionRequest
from lmforge.serve.state import ApiError, ServerState, chat_ids, check_ids, check_length, check_model, engine_of

# proxies (nginx) must pass each token on at once rather than buffer the stream
SSE_HEADERS = {"X-Accel-Buffering": "no", "Cache-Control": "no-cache"}


def sampling_params(req, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          top_k=max(req.top_k, 0), n=req.n, seed=req.seed, stop=list(req.stop or []),
                          stop_token_ids=list(req.stop_token_ids or []), presence_penalty=req.presence_penalty,
                          frequency_penalty=req.frequency_penalty, logprobs=logprobs,
                          prompt_logprobs=prompt_logprobs, ignore_eos=req.ignore_eos)


class Call:
    """The engine requests behind one HTTP call: one per prompt, events merged into one asyncio queue."""

    def __init__(self, state: ServerState, prompts: list[list[int]], params: SamplingParams):
        engine = engine_of(state)
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


def completion_logprobs(state: ServerState, entries: list[tuple[int, TokenLogprob | None]], offset: int) -> dict:
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


def chat_logprobs(state: ServerState, entries: list[TokenLogprob]) -> dict:
    def item(token_id, lp):
        s = _tok_str(state, token_id)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _stream(call: Call, chunks, include_usage: bool, usage_chunk):
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


def streaming_response(call: Call, chunks, req, usage_chunk) -> StreamingResponse:
    include = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(_stream(call, chunks, include, usage_chunk), media_type="text/event-stream",
                             headers=SSE_HEADERS)


# ---- /v1/completions ---------------------------------------------------------------------------

def _prompts(state: ServerState, req: CompletionRequest) -> tuple[list, list[list[int]]]:
    """The prompts as given (strings or token ids) and as token ids; 400 for an empty one or a bad id."""
    prompts = [req.prompt] if isinstance(req.prompt, str) or isinstance(req.prompt[0], int) else req.prompt
    ids = []
    for p in prompts:
        t = check_ids(state, p, "prompt") if isinstance(p, list) else state.tokenizer(p).input_ids
        if not t:
            raise ApiError(400, "prompt is empty", param="prompt")
        ids.append(t)
    return prompts, ids


class _Choices:
    """A completion call's choices as events arrive: echo of the prompt and the logprobs' running text offsets."""

    def __init__(self, state: ServerState, req: CompletionRequest, prompts: list, ids: list[list[int]]):
        self.state, self.req, self.ids = state, req, ids
        self.prompt_texts = [p if isinstance(p, str) else state.tokenizer.decode(p) for p in prompts]
        self.offsets: dict[int, int] = {}
        self.started: set[tuple[int, int]] = set()

    def logprobs(self, k: int, i: int, ev: Event) -> dict | None:
        if self.req.logprobs is None:
            return None
        entries = []
        if ev.prompt_logprobs is not None:
            entries += list(zip(self.ids[k], ev.prompt_logprobs))
        entries += [(e.token_id, e) for e in ev.logprobs]
        start = self.offsets.get(k * self.req.n + i, 0)
        out = completion_logprobs(self.state, entries, start)
        self.offsets[k * self.req.n + i] = start + sum(len(s) for s in out["tokens"])
        return out

    def text(self, k: int, ev: Event) -> str:
        """The event's text, after the prompt's on the first event of each choice when echo is on."""
        first = self.req.echo and (k, ev.index) not in self.started
        self.started.add((k, ev.index))
        return (self.prompt_texts[k] if first else "") + ev.text

    def chunks(self, head: dict):
        def chunks(k, ev):
            text = self.text(k, ev)
            if text or ev.finish_reason or ev.logprobs:
                yield {**head, "choices": [{"index": k * self.req.n + ev.index, "text": text,
                                            "logprobs": self.logprobs(k, ev.index, ev),
                                            "finish_reason": ev.finish_reason}]}
        return chunks

    async def collect(self, call: Call, http: HTTPRequest) -> tuple[list[dict], int]:
        """Every choice whole, in index order, and the completion tokens."""
        choices: dict[int, dict] = {}
        completion_tokens = 0
        async for k, ev in call.events(http):
            i = k * self.req.n + ev.index
            c = choices.setdefault(i, {"index": i, "text": "", "logprobs": None, "finish_reason": None})
            c["text"] += self.text(k, ev)
            lp = self.logprobs(k, ev.index, ev)
            if lp is not None:
                if c["logprobs"] is None:
                    c["logprobs"] = lp
                else:
                    for key in lp:
                        c["logprobs"][key] += lp[key]
            c["finish_reason"] = ev.finish_reason or c["finish_reason"]
            completion_tokens += len(ev.token_ids)
        return [choices[i] for i in sorted(choices)], completion_tokens


async def completions(req: CompletionRequest, http: HTTPRequest):
    state: ServerState = http.app.state.lmforge
    engine_of(state)
    model = check_model(state, req.model)
    if req.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if req.best_of not in (None, req.n):
        raise ApiError(400, "best_of must equal n (candidates are not ranked)", param="best_of")
    prompts, ids = _prompts(state, req)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens must be at least 1 unless echo is true", param="max_tokens")
    for t in ids:
        check_length(state, len(t), max_tokens, "prompt")
    want_prompt_lp = req.echo and req.logprobs is not None
    call = Call(state, ids, sampling_params(req, max_tokens, req.logprobs, req.logprobs if want_prompt_lp else None))
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()), "model": model}
    out = _Choices(state, req, prompts, ids)
    n_prompt = sum(map(len, ids))
    if req.stream:
        return streaming_response(call, out.chunks(head), req,
                                  lambda c: {**head, "choices": [], "usage": usage(n_prompt, c)})
    choices, completion_tokens = await out.collect(call, http)
    return {**head, "choices": choices, "usage": usage(n_prompt, completion_tokens)}


# ---- /v1/chat/completions ----------------------------------------------------------------------

def _chat_chunks(state: ServerState, req: ChatRequest, base: dict):
    started: set[int] = set()

    def chunks(_, ev):
        if ev.index not in started:
            started.add(ev.index)
            yield {**base, "choices": [{"index": ev.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        if ev.text or ev.finish_reason or ev.logprobs:
            delta = {"content": ev.text} if ev.text else {}
            yield {**base, "choices": [{"index": ev.index, "delta": delta,
                                        "logprobs": chat_logprobs(state, ev.logprobs) if req.logprobs else None,
                                        "finish_reason": ev.finish_reason}]}
    return chunks


async def _collect_chat(state: ServerState, req: ChatRequest, call: Call, http: HTTPRequest) -> tuple[list[dict], int]:
    choices: dict[int, dict] = {}
    completion_tokens = 0
    async for _, ev in call.events(http):
        c = choices.setdefault(ev.index, {"index": ev.index, "message": {"role": "assistant", "content": ""},
                                          "logprobs": {"content": []} if req.logprobs else None,
                                          "finish_reason": None})
        c["message"]["content"] += ev.text
        if req.logprobs:
            c["logprobs"]["content"] += chat_logprobs(state, ev.logprobs)["content"]
        c["finish_reason"] = ev.finish_reason or c["finish_reason"]
        completion_tokens += len(ev.token_ids)
    return [choices[i] for i in sorted(choices)], completion_tokens


async def chat_completions(req: ChatRequest, http: HTTPRequest):
    state: ServerState = http.app.state.lmforge
    engine_of(state)
    model = check_model(state, req.model)
    ids = chat_ids(state, req.messages, req.add_generation_prompt)
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens is None:
        max_tokens = state.max_model_len - len(ids)
        if max_tokens < 1:
            check_length(state, len(ids), 1, "messages")
    check_length(state, len(ids), max_tokens, "messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    call = Call(state, [ids], sampling_params(req, max_tokens, logprobs, None))
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    if req.stream:
        return streaming_response(call, _chat_chunks(state, req, base), req,
                                  lambda c: {**base, "choices": [], "usage": usage(len(ids), c)})
    choices, completion_tokens = await _collect_chat(state, req, call, http)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
            "usage": usage(len(ids), completion_tokens)}
