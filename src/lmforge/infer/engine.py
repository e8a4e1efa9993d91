"""The continuous-batching engine: one thread that admits, prefills, decodes, samples and streams.

Every step it drops cancelled and timed-out sequences, admits waiting requests into free slots
(prefilling each new prompt, at most `max_prefill_tokens` per step so running sequences keep
moving), runs one decode step over every running sequence, samples each row with its request's
parameters, detokenizes incrementally, checks EOS, stop tokens, stop strings and length, and
hands each request an `Event` through its `sink`. A finished sequence leaves the batch at once and
its KV slot is reused by the next one. Request threads and the engine share only the waiting
queue (under a lock) and each request's `cancelled` flag.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from lmforge.errors import UserError
from lmforge.infer.runner import Runner

log = logging.getLogger("lmforge.infer")
SEED_STRIDE = 0x9E3779B97F4A7C15  # sequence i of a request with seed s draws from seed s + i * this
IDLE_RELEASE_S = 30.0  # the KV cache is freed after this long without work; reallocating costs ~0.3 s


class QueueFull(Exception):
    """The waiting queue holds max_queue requests; the API answers 429."""


@dataclass
class SamplingParams:
    """Per-request decoding parameters (OpenAI's names; vLLM's extras top_k, ignore_eos, stop_token_ids)."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # top log-probabilities per generated token (None: none at all)
    prompt_logprobs: int | None = None  # the same for every prompt token (echo + logprobs)
    ignore_eos: bool = False


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class Event:
    """What one sequence produced since the last event: new text and tokens, and why it finished (or None)."""
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None  # stop | length | abort | timeout
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, on the first event of each sequence


@dataclass
class Request:
    """A prompt (token ids) and its parameters; events go to `sink`.

    Without `loop`, the engine thread calls `sink`; with an asyncio `loop`, `sink` runs in that loop's
    thread, and the engine wakes each loop once per step with all of its events (not once per token).
    """
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    loop: asyncio.AbstractEventLoop | None = None
    timeout: float | None = None
    cancelled: bool = False
    arrival: float = field(default_factory=time.monotonic)
    live: int = 0  # sequences of this request still running


class _Detokenizer:
    """Incremental detokenization (vLLM's prefix/read offsets): text only once it is complete UTF-8.

    Decoding a few prompt tokens in front keeps a leading space or merge right for SentencePiece models.
    """

    def __init__(self, tok, prompt_ids: list[int]):
        self.tok = tok
        self.ids = list(prompt_ids[-6:])
        self.prefix = max(len(self.ids) - 5, 0)
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""


@dataclass
class _Seq:
    req: Request
    index: int
    detok: _Detokenizer
    generator: torch.Generator | None
    cached: int = 0  # tokens whose K/V are in the cache
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # all text decoded so far (stop strings are searched here)
    sent: int = 0  # characters of `text` already handed out
    counts: torch.Tensor | None = None  # generated-token counts, for presence/frequency penalties
    first_token_at: float | None = None
    last_token_at: float | None = None
    pending_prompt_logprobs: list | None = None


def _deliver(batch: list) -> None:
    for sink, ev in batch:
        sink(ev)


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[int, float]]:
    if k <= 0:
        return []
    vals, idx = logprobs.topk(k)
    return list(zip(idx.tolist(), vals.tolist()))


class Engine:
    """Continuous batching over a `Runner`; `submit` from any thread, `start`/`stop` the loop thread."""

    def __init__(self, model, tokenizer, eos_ids: list[int], *, max_batch: int = 32, max_queue: int = 256,
                 max_model_len: int | None = None, max_prefill_tokens: int = 1024, threads: int | None = None,
                 metrics=None):
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        if max_model_len is not None and max_model_len > limit:
            raise UserError(f"--max-model-len {max_model_len} is more than the model's {limit} positions")
        self.max_model_len = max_model_len or limit
        self.runner = Runner(model, max_slots=max_batch, max_len=self.max_model_len)
        self.tok, self.eos_ids = tokenizer, set(eos_ids)
        self.max_batch, self.max_queue, self.max_prefill_tokens = max_batch, max_queue, max_prefill_tokens
        self.threads, self.metrics = threads, metrics
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[_Seq] = []  # running[i] lives in KV slot i
        self.outbox: list[tuple[Request, Event]] = []  # this step's events, handed over by _flush
        self.admitting: list[Request] = []  # the requests this step admits
        self.lock = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False

    @property
    def vocab_size(self) -> int:
        return self.runner.vocab_size

    # ---- thread interface --------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        """Queue a request; QueueFull when max_queue requests already wait."""
        if req.params.n > self.max_batch:
            raise UserError(f"n={req.params.n} is more than the server's --max-batch {self.max_batch}")
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(req)
            self._gauges()
            self.lock.notify()

    def start(self) -> None:
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.lock:
            self.stopping = True
            self.lock.notify()
        if self.thread is not None:
            self.thread.join()

    @torch.inference_mode()
    def drain(self) -> None:
        """Step in the calling thread until nothing waits or runs (no engine thread must be started).

        Offline callers that need the same batches every time (seeded RL rollouts) use this: admission
        then depends only on the submitted requests, never on thread timing."""
        while self.waiting or self.running:
            self.step()
            self._flush()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(len(self.running))
            self.metrics.waiting.set(len(self.waiting))

    @torch.inference_mode()
    def _loop(self) -> None:
        if self.threads:  # OpenMP's thread count is per thread: set it where the model runs
            torch.set_num_threads(self.threads)
        while True:
            with self.lock:
                while not self.stopping and not self.waiting and not self.running:
                    if not self.lock.wait(timeout=IDLE_RELEASE_S):
                        self.runner.release()  # idle: give the KV memory back
                        self.lock.wait()
                if self.stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug must not kill the engine: fail the requests in flight, keep serving
                log.exception("engine step failed; aborting the running requests")
                for s in self.running:
                    self.outbox.append((s.req, Event(s.index, "", [], [], "abort")))
                for req in self.admitting:  # popped from the queue, maybe not running yet: they must hear too
                    self.outbox.append((req, Event(0, "", [], [], "abort")))
                self.running.clear()
                self.runner.release()
                self._gauges()
            self._flush()

    def _flush(self) -> None:
        """Hand this step's events over: directly, or one wake-up per event loop."""
        items, self.outbox = self.outbox, []
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for req, ev in items:
            if req.loop is None:
                req.sink(ev)
            else:
                batches.setdefault(req.loop, []).append((req.sink, ev))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_deliver, batch)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> None:
        """Reap, admit, then one forward pass: a decode token for every running sequence plus the new prompts."""
        now = time.monotonic()
        for s in list(self.running):
            if s.req.cancelled:
                self._finish(s, "abort")
            elif s.req.timeout is not None and now - s.req.arrival > s.req.timeout:
                self._finish(s, "timeout")
        admitted = self.admitting = self._admit()
        if not self.running and not admitted:
            return
        prefills, slot = [], len(self.running)
        for req in admitted:  # each new request gets n slots after the running ones; its prompt goes in the first
            prefills.append((slot, req.prompt_ids, req.params.prompt_logprobs is not None))
            slot += req.params.n
        decode_logits, prompt_logits = self.runner.forward([(s.tokens[-1], s.cached) for s in self.running], prefills)
        seqs, rows = list(self.running), [decode_logits]
        for s in seqs:
            s.cached += 1
        started = [self._start(req, slot, logits) for req, (slot, _, _), logits in zip(admitted, prefills, prompt_logits)]
        for req, new, logits in zip(admitted, started, prompt_logits):
            if req.params.max_tokens == 0:  # echo only: the prompt's log-probabilities are the whole answer
                for s in new:
                    self._finish(s, "length")
            else:
                seqs += new
                rows.append(logits[-1:].expand(len(new), -1))
        if seqs:
            self._advance(seqs, torch.cat(rows) if len(rows) > 1 else rows[0])

    def _admit(self) -> list[Request]:
        """Pop the waiting requests that fit this step: free slots for all n sequences, prefill token budget."""
        admitted, budget, slots = [], self.max_prefill_tokens, self.max_batch - len(self.running)
        with self.lock:
            while self.waiting:
                req = self.waiting[0]
                expired = req.timeout is not None and time.monotonic() - req.arrival > req.timeout
                if req.cancelled or expired:
                    self.waiting.popleft()
                    if expired:
                        self.outbox.append((req, Event(0, "", [], [], "timeout")))
                        if self.metrics is not None:
                            self.metrics.finished("timeout", time.monotonic() - req.arrival)
                    continue
                if req.params.n > slots or (admitted and len(req.prompt_ids) > budget):
                    break  # a long prompt waits for a step of its own rather than stall this one
                self.waiting.popleft()
                admitted.append(req)
                budget -= len(req.prompt_ids)
                slots -= req.params.n
            self._gauges()
        return admitted

    def _start(self, req: Request, slot: int, logits: torch.Tensor) -> list[_Seq]:
        """The n sequences of a just-prefilled request, appended to the batch; copies 2..n get the prompt's KV."""
        p = req.params
        prompt_lp = self._prompt_logprobs(req, logits) if p.prompt_logprobs is not None else None
        seqs = []
        for i in range(p.n):
            if i:
                self.runner.move(slot, slot + i, len(req.prompt_ids))
            generator = None
            if p.seed is not None:  # one generator per sequence: its draws do not depend on the other traffic
                generator = torch.Generator(device=self.runner.device).manual_seed((p.seed + i * SEED_STRIDE) % 2**64)
            s = _Seq(req=req, index=i, detok=_Detokenizer(self.tok, req.prompt_ids), generator=generator,
                     cached=len(req.prompt_ids), pending_prompt_logprobs=prompt_lp)
            if p.presence_penalty or p.frequency_penalty:
                s.counts = torch.zeros(self.runner.vocab_size, device=logits.device)
            seqs.append(s)
            self.running.append(s)
        req.live = p.n
        self._gauges()
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        return seqs

    def _prompt_logprobs(self, req: Request, logits: torch.Tensor) -> list[TokenLogprob | None]:
        lp = torch.log_softmax(logits[:-1], dim=-1)
        ids = req.prompt_ids
        chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
        out: list[TokenLogprob | None] = [None]
        for t in range(1, len(ids)):
            out.append(TokenLogprob(ids[t], chosen[t - 1], _top(lp[t - 1], req.params.prompt_logprobs)))
        return out

    # ---- sampling ----------------------------------------------------------------------------
    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> list[int]:
        """One token per row of `logits` (rows match `seqs`), each with its own request's parameters."""
        chosen: list[int | None] = [None] * len(seqs)
        sampled = []
        for i, s in enumerate(seqs):
            p = s.req.params
            if s.counts is not None:
                logits[i] -= p.frequency_penalty * s.counts + p.presence_penalty * (s.counts > 0)
            if p.temperature <= 0:
                continue
            sampled.append(i)
        greedy = sorted(set(range(len(seqs))) - set(sampled))
        if greedy:
            picks = logits[greedy].argmax(dim=-1).tolist()
            for i, t in zip(greedy, picks):
                chosen[i] = t
        if sampled:
            rows = logits[sampled]
            temp = torch.tensor([seqs[i].req.params.temperature for i in sampled], device=rows.device)
            rows = rows / temp[:, None]
            top_k = [seqs[i].req.params.top_k for i in sampled]
            if any(k > 0 for k in top_k):
                kmax = min(max(top_k), rows.shape[-1])
                kth = rows.topk(kmax, dim=-1).values
                ks = torch.tensor([min(k, kmax) if k > 0 else kmax for k in top_k], device=rows.device)
                cutoff = kth.gather(1, (ks - 1)[:, None])
                off = torch.tensor([k <= 0 for k in top_k], device=rows.device)[:, None]
                rows = rows.masked_fill((rows < cutoff) & ~off, float("-inf"))
            probs = rows.softmax(dim=-1)
            top_p = torch.tensor([seqs[i].req.params.top_p for i in sampled], device=rows.device)
            if (top_p < 1).any():
                sorted_p, order = probs.sort(dim=-1, descending=True)
                # drop a token when the tokens ranked above it already hold top_p of the mass
                drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p[:, None]
                probs = probs.scatter(1, order, sorted_p.masked_fill(drop, 0.0))
            # exponential race: argmax(p / E), E ~ Exp(1), is a draw from p; each row uses its own generator
            noise = torch.empty_like(probs)
            for r, i in enumerate(sampled):
                noise[r].exponential_(generator=seqs[i].generator)
            picks = (probs / noise).argmax(dim=-1).tolist()
            for i, t in zip(sampled, picks):
                chosen[i] = t
        return chosen  # type: ignore[return-value]

    def _advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample, record and stream one token for each of `seqs`; finish those that are done."""
        want_lp = [s.req.params.logprobs is not None for s in seqs]
        raw_lp = torch.log_softmax(logits[[i for i, w in enumerate(want_lp) if w]], dim=-1) if any(want_lp) else None
        tokens = self._sample(seqs, logits.clone() if any(s.counts is not None for s in seqs) else logits)
        now = time.monotonic()
        lp_row = 0
        for i, (s, t) in enumerate(zip(seqs, tokens)):
            p = s.req.params
            lps = []
            if want_lp[i]:
                row = raw_lp[lp_row]
                lp_row += 1
                lps.append(TokenLogprob(t, row[t].item(), _top(row, p.logprobs)))
            s.tokens.append(t)
            if s.counts is not None:
                s.counts[t] += 1
            if self.metrics is not None:
                self.metrics.generation_tokens.inc()
                if s.first_token_at is None:
                    self.metrics.ttft.observe(now - s.req.arrival)
                else:
                    self.metrics.itl.observe(now - s.last_token_at)
            if s.first_token_at is None:
                s.first_token_at = now
            s.last_token_at = now
            finish = None
            if t in self.eos_ids and not p.ignore_eos or t in p.stop_token_ids:
                finish = "stop"
            else:
                s.text += s.detok.add(t)
            held = 0
            if p.stop and finish is None:
                hit = self._stop_hit(s)
                if hit is not None:
                    s.text, finish = s.text[:hit], "stop"
                else:
                    held = max(len(x) for x in p.stop) - 1  # could be the start of a stop string
            if finish is None and (len(s.tokens) >= p.max_tokens
                                   or len(s.req.prompt_ids) + len(s.tokens) >= self.max_model_len):
                finish, held = "length", 0
            self._emit(s, [t], lps, finish, held)
            if finish is not None:
                self._remove(s, finish)

    @staticmethod
    def _stop_hit(s: _Seq) -> int | None:
        """Index in s.text where the first stop string begins, searching only text that could contain a new one."""
        longest = max(len(x) for x in s.req.params.stop)
        start = max(0, s.sent - longest)
        found = [i for i in (s.text.find(x, start) for x in s.req.params.stop if x) if i >= 0]
        return min(found) if found else None

    def _emit(self, s: _Seq, token_ids: list[int], lps: list[TokenLogprob], finish: str | None, held: int) -> None:
        end = len(s.text) if finish is not None else max(s.sent, len(s.text) - held)
        text, s.sent = s.text[s.sent:end], end
        prompt_lp, s.pending_prompt_logprobs = s.pending_prompt_logprobs, None
        self.outbox.append((s.req, Event(s.index, text, token_ids, lps, finish, prompt_lp)))

    def _finish(self, s: _Seq, reason: str) -> None:
        """End a sequence that produces no token this step (cancelled, timed out, echo-only)."""
        self._emit(s, [], [], reason, 0)
        self._remove(s, reason)

    def _remove(self, s: _Seq, reason: str) -> None:
        """Take `s` out of the batch at once; the last running sequence moves into its KV slot."""
        slot = self.running.index(s)
        last = self.running.pop()
        if last is not s:
            self.runner.move(len(self.running), slot, last.cached)
            self.running[slot] = last
        self._gauges()
        s.req.live -= 1
        if self.metrics is not None and s.req.live == 0:
            self.metrics.finished(reason, time.monotonic() - s.req.arrival)


@dataclass
class Completion:
    """One finished sequence: its text, its token ids (a stop token included) and why it ended (stop or length)."""
    text: str
    token_ids: list[int]
    finish_reason: str


def run_batch(engine: Engine, requests: list[tuple[list[int], SamplingParams]],
              on_event: Callable[[int, Event], None] | None = None, drain: bool = False) -> list[Completion]:
    """Submit every (prompt ids, params) to a started engine (or, with `drain`, a stopped one) and wait for all.

    Returns each request's `n` completions, request by request. For offline callers (generation,
    evaluation, answer generation); `on_event(request index, event)` sees every event as it comes (on
    the engine thread). RuntimeError when any request was aborted."""
    seqs = [[Completion("", [], "") for _ in range(params.n)] for _, params in requests]
    live = [params.n for _, params in requests]  # sequences of each request still running
    failed: list[int] = []
    done = threading.Condition()

    def sink_for(i: int):
        def sink(ev: Event) -> None:  # runs on the engine thread
            c = seqs[i][ev.index]
            c.text += ev.text
            c.token_ids += ev.token_ids
            if on_event is not None:
                on_event(i, ev)
            if ev.finish_reason is None:
                return
            c.finish_reason = ev.finish_reason
            with done:
                if ev.finish_reason in ("stop", "length"):
                    live[i] -= 1
                elif live[i]:  # aborted or timed out: the request's other sequences may never report
                    failed.append(i)
                    live[i] = 0
                done.notify()
        return sink

    for i, (ids, params) in enumerate(requests):
        engine.submit(Request(ids, params, sink_for(i)))
    if drain:
        engine.drain()
    with done:
        done.wait_for(lambda: not any(live))
    if failed:
        raise RuntimeError(f"generation failed for {len(failed)} of {len(requests)} prompts "
                           f"(first: #{min(failed) + 1}); see the log above")
    return [c for per_request in seqs for c in per_request]
