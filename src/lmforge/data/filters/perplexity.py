"""Perplexity filter: score each document with a reference causal LM, keep a perplexity band.

Perplexity = exp(mean next-token negative log-likelihood) over the document's first `max_tokens`
tokens (as the tokenizer encodes them, special tokens included), in batches, without gradients.
Right padding keeps every real token's position, so a document scores the same alone or batched.
The model is any HF causal LM directory (one lmforge trained, a converted SmolLM2, ...); it is
loaded on first use, so building the step (and `lmforge data --help`) imports no torch.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator, Literal

from pydantic import Field

from lmforge.config import ConfigError
from lmforge.data.base import Document, StepStats
from lmforge.data.filters.quality import FilterConfig


class PerplexityConfig(FilterConfig):
    """Sets doc.meta["perplexity"]; a document with fewer than 2 tokens has none (perplexity_too_short)."""

    model: str = Field(description="HF causal LM directory (config.json, weights, tokenizer)")
    max_tokens: int = Field(512, ge=2, description="score at most this many tokens of each document")
    batch_size: int = Field(8, ge=1, description="documents per forward pass")
    max_perplexity: float | None = Field(None, description="above -> perplexity_high")
    min_perplexity: float | None = Field(None, description="below -> perplexity_low")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")


def load_scorer(model_dir: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer, device) ready for `perplexities`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if str(device).startswith("cuda") else "float32"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).to(device).eval()
    return model, tokenizer, device


def perplexities(model, tokenizer, texts: list[str], max_tokens: int, device="cpu") -> list[float | None]:
    """Per-text exp(mean NLL of tokens 2..N given their prefix), N <= max_tokens; None below 2 tokens."""
    import torch
    import torch.nn.functional as F

    ids = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_tokens)["input_ids"]
    lengths = [len(x) for x in ids]
    out: list[float | None] = [None] * len(texts)
    rows = [i for i, n in enumerate(lengths) if n >= 2]
    if not rows:
        return out
    width = max(lengths[i] for i in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, i in enumerate(rows):
        input_ids[r, : lengths[i]] = torch.tensor(ids[i])
        mask[r, : lengths[i]] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1), reduction="none")
        m = mask[:, 1:].float()
        mean_nll = (nll.view_as(m) * m).sum(1) / m.sum(1)
    for r, v in zip(rows, mean_nll.tolist()):
        out[r] = math.exp(v) if v < 700 else math.inf
    return out


class PerplexityStep:
    """A step (not a per-document predicate) because scoring is batched."""

    def __init__(self, cfg: PerplexityConfig, name: str = "perplexity"):
        if not Path(cfg.model, "config.json").is_file():
            raise ConfigError(f"perplexity.model: {cfg.model} is not a HF model directory (no config.json)")
        self.cfg, self.name = cfg, cfg.name or name
        self._scorer = None

    def __getstate__(self):  # ship the config, not the loaded model, to worker processes
        return {**self.__dict__, "_scorer": None}

    def _decide(self, doc: Document, ppl: float | None, stats: StepStats) -> bool:
        if ppl is None:
            stats.drop("perplexity_too_short", doc.id)
            return False
        doc.meta["perplexity"] = ppl
        if self.cfg.max_perplexity is not None and ppl > self.cfg.max_perplexity:
            stats.drop("perplexity_high", doc.id)
            return False
        if self.cfg.min_perplexity is not None and ppl < self.cfg.min_perplexity:
            stats.drop("perplexity_low", doc.id)
            return False
        return True

    def _flush(self, batch: list[Document], stats: StepStats) -> Iterator[Document]:
        if self._scorer is None:
            self._scorer = load_scorer(self.cfg.model, self.cfg.device, self.cfg.dtype)
        model, tokenizer, device = self._scorer
        scores = perplexities(model, tokenizer, [d.text for d in batch], self.cfg.max_tokens, device)
        for doc, ppl in zip(batch, scores):
            if self._decide(doc, ppl, stats):
                yield doc

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == self.cfg.batch_size:
                yield from self._flush(batch, stats)
                batch = []
        if batch:
            yield from self._flush(batch, stats)
