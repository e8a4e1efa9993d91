"""Generation through transformers' `generate`, for architectures the fused runner does not cover.

The same `SamplingParams` and `Completion`s as the engine: prompts that share their parameters go
in left-padded batches of `batch_size`; a batch is seeded with its first prompt's seed (one torch
generator for the batch, unlike the engine's one per sequence); the text is cut before the first
stop token or stop string.
"""
from __future__ import annotations

from typing import Callable

import torch

from lmforge.errors import UserError
from lmforge.infer.engine import Completion, SamplingParams


def _streamer(tok, on_text: Callable[[str], None]):
    """A transformers streamer that hands finalised text to `on_text` (the prompt and special tokens left out)."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            on_text(text)

    return Streamer(tok, skip_prompt=True, skip_special_tokens=True)


def _complete(tok, row: list[int], stops: list[int], params: SamplingParams) -> Completion:
    """The Completion of one generated row: up to and including its first stop token, then cut at a stop string."""
    end = next((i for i, t in enumerate(row) if t in stops), None)
    if end is not None:
        return Completion(tok.decode(row[:end], skip_special_tokens=True), row[:end + 1], "stop")
    text = tok.decode(row, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in params.stop if s) if i >= 0]
    if hits:
        return Completion(text[:min(hits)], row, "stop")
    return Completion(text, row, "length")


def _check(p: SamplingParams) -> None:
    """Refuse what only the engine implements, rather than ignore it."""
    asked = {"logprobs": p.logprobs is not None, "prompt_logprobs": p.prompt_logprobs is not None,
             "presence_penalty": p.presence_penalty != 0, "frequency_penalty": p.frequency_penalty != 0,
             "ignore_eos": p.ignore_eos}
    unsupported = [name for name, on in asked.items() if on]
    if unsupported:
        raise UserError(f"{', '.join(unsupported)}: not supported for this architecture (transformers' generate "
                         f"runs it, not lmforge's engine)")


def hf_generate(model, tok, prompts: list[list[int]], params: list[SamplingParams], stops: list[int],
                batch_size: int = 8, on_text: Callable[[str], None] | None = None) -> list[Completion]:
    """Each prompt's `params.n` completions, prompt by prompt; `on_text` streams the text of a single prompt.

    Rows of prompts with equal parameters share a batch; a prompt's seed is set before its first row."""
    if on_text is not None and (len(prompts) != 1 or params[0].n != 1):
        raise UserError("streaming generates one sequence of one prompt at a time")
    for p in params:
        _check(p)
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
    rows = [(ids, i, p) for ids, p in zip(prompts, params) for i in range(p.n)]  # (prompt, sequence, params)
    out: list[Completion] = []
    start = 0
    while start < len(rows):
        p = rows[start][2]
        end = start + 1
        while end < len(rows) and end - start < batch_size and rows[end][2] == p:
            end += 1
        if p.seed is not None and rows[start][1] == 0:
            torch.manual_seed(p.seed)
        out += _generate_rows(model, tok, [r[0] for r in rows[start:end]], p, stops + p.stop_token_ids, pad, dev,
                              None if on_text is None else _streamer(tok, on_text))
        start = end
    return out


def _generate_rows(model, tok, prompts: list[list[int]], p: SamplingParams, stops: list[int], pad: int, dev,
                   streamer) -> list[Completion]:
    """One left-padded batch through `model.generate`."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompts], device=dev)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts], device=dev)
    greedy = p.temperature <= 0
    with torch.no_grad():
        gen = model.generate(input_ids, attention_mask=mask, max_new_tokens=p.max_tokens, do_sample=not greedy,
                             temperature=None if greedy else p.temperature,
                             top_k=None if greedy else p.top_k, top_p=None if greedy else p.top_p,
                             eos_token_id=stops or None, pad_token_id=pad, streamer=streamer,
                             stop_strings=[s for s in p.stop if s] or None, tokenizer=tok if p.stop else None)
    return [_complete(tok, row, stops, p) for row in gen[:, width:].tolist()]
