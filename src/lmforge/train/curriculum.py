"""Curriculum learning: the order in which training examples come, from easy to hard (or a growing easy pool).

Difficulty (lower is easier):
- perplexity (the guide's method): an example's mean next-token NLL, i.e. log perplexity, under
  `reference_model` (any model source lmforge loads; fine-tuning defaults to base_model), over its target
  tokens (SFT) or all its tokens (pretraining windows). The reference must share the run's token ids.
- length: the example's tokens (fine-tuning only).
- field: a numeric field of each record, smaller is easier (fine-tuning only).

An example is one SFT example of the train split when fine-tuning; when pretraining it is one fixed window: the
train tokens cut into non-overlapping windows of seq_len + 1 tokens starting at k·seq_len (the windows of
data.sampling=sequential), scored as a whole. Windows all have one length and no record fields, so pretraining
takes perplexity only.

Orders, for G = the global batch (micro_batch_size · grad_accum · world size, in examples or packed rows):
- easy_to_hard / hard_to_easy: the examples sorted by score (ties in a seed-keyed random order); step s takes
  units s·G .. s·G + G − 1 of that order, and every epoch repeats it.
- competence (Platanios et al. 2019, square root): c(t) = min(1, sqrt(t · (1 − c0²) / T + c0²)) at step t (0-based),
  T = competence_steps; step t draws its G examples uniformly, by Philox keyed (seed, t), from the easiest
  ceil(c(t) · N). With packing, the draws fill G rows greedily.
Batches are thus a pure function of (seed, step): a resumed run continues the same order, and a run on N processes
sees what one process with the same global batch sees. Perplexity scores are computed once (rank 0) and cached as
out_dir/curriculum-<fingerprint>.npy, the fingerprint hashing the difficulty, the examples' tokens and the
reference model (spec, weight files' names, sizes and mtimes): a resumed run, or a new run in the same directory
on the same data and model, reads them back.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, model_validator

from lmforge.config import Strict
from lmforge.errors import UserError
from lmforge.train.sft_data import IGNORE, Example, collate, pack

if TYPE_CHECKING:
    import torch

SCORE_TOKENS = 2048  # tokens per scoring forward (SFT examples share padding-free rows)
SCORE_WINDOWS = 16  # windows per scoring forward (pretraining)


class CurriculumConfig(Strict):
    difficulty: Literal["perplexity", "length", "field"] = Field(
        "perplexity", description="perplexity under reference_model, tokens per example, or a record field")
    reference_model: str | None = Field(None, description="difficulty=perplexity: the scoring model (fine-tuning "
                                                          "default: base_model)")
    field: str | None = Field(None, description="difficulty=field: a numeric record field, smaller is easier")
    order: Literal["easy_to_hard", "hard_to_easy", "competence"] = "competence"
    c0: float = Field(0.1, gt=0, le=1, description="competence: the easiest fraction the pool starts from")
    competence_steps: int | None = Field(None, gt=0, description="competence: T, the step the pool reaches all data; "
                                                                 "default train.max_steps")

    @model_validator(mode="after")
    def _check(self):
        if self.difficulty == "field" and self.field is None:
            raise ValueError("curriculum.difficulty=field needs curriculum.field (a numeric record field)")
        if self.field is not None and self.difficulty != "field":
            raise ValueError(f"curriculum.field applies to difficulty=field (got difficulty={self.difficulty})")
        if self.reference_model is not None and self.difficulty != "perplexity":
            raise ValueError(f"curriculum.reference_model applies to difficulty=perplexity (got {self.difficulty})")
        return self


def competence(step: int, c0: float, T: int) -> float:
    """Platanios et al.'s square-root competence: c0 at step 0, 1 from step T on."""
    return min(1.0, math.sqrt(step * (1 - c0 * c0) / T + c0 * c0))


def ranked(scores: np.ndarray, order: str, seed: int) -> np.ndarray:
    """Example indices in curriculum order: easiest first (hardest first for hard_to_easy), ties by a seeded shuffle."""
    tiebreak = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x637572]))).permutation(len(scores))
    key = -scores if order == "hard_to_easy" else scores
    return np.lexsort((tiebreak, key))


@dataclass
class Schedule:
    """Which examples step t's global batch takes: a pure function of (seed, step)."""

    rank: np.ndarray  # example indices in curriculum order
    order: str
    c0: float
    T: int
    seed: int

    def pool(self, step: int) -> int:
        """How many of the easiest examples step `step` draws from (all of them for the sorted orders)."""
        if self.order != "competence":
            return len(self.rank)
        return max(1, math.ceil(competence(step, self.c0, self.T) * len(self.rank)))

    def draws(self, step: int) -> np.random.Generator:
        return np.random.Generator(np.random.Philox(key=[self.seed, step]))

    def indices(self, step: int, n: int) -> np.ndarray:
        """The `n` example indices of step `step` (sorted orders: the next n in order, epochs repeating it)."""
        if self.order == "competence":
            return self.rank[self.draws(step).integers(0, self.pool(step), n)]
        return self.rank[(step * n + np.arange(n)) % len(self.rank)]


@dataclass
class CurriculumBatches:
    """The engine's `train_batches` for SFT data in curriculum order; the layout of sft_data.TrainBatches."""

    examples: list[Example]
    schedule: Schedule
    packing: bool
    max_length: int
    pad_id: int
    _rows: list = field(default_factory=list, init=False, repr=False)  # sorted orders with packing: the packed rows
    _last: tuple = field(default=(None, None), init=False, repr=False)  # (step, its units)

    def units(self, step: int, n: int) -> list[np.ndarray]:
        """Step `step`'s n units (example index arrays: one example, or a packed row)."""
        if not self.packing:
            return [np.array([i]) for i in self.schedule.indices(step, n)]
        lengths = [len(ex) for ex in self.examples]
        if self.schedule.order != "competence":
            if not self._rows:
                self._rows = pack(self.schedule.rank, np.asarray(lengths), self.max_length)
            return [self._rows[u % len(self._rows)] for u in range(step * n, step * n + n)]
        g, pool, rows, row, used = self.schedule.draws(step), self.schedule.pool(step), [], [], 0
        while len(rows) < n:
            i = int(self.schedule.rank[g.integers(0, pool)])
            if row and used + lengths[i] > self.max_length:
                rows.append(np.asarray(row))
                row, used = [], 0
            row.append(i)
            used += lengths[i]
        return rows

    def __call__(self, step: int, micro_bs: int, accum: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        n = micro_bs * accum * world
        if self._last[0] != (step, n):
            self._last = ((step, n), self.units(step, n))
        units, out = self._last[1], []
        for m in range(accum):
            lo = (m * world + rank) * micro_bs
            mine = units[lo:lo + micro_bs]
            out.append(collate(self.examples, mine if self.packing else [np.concatenate(mine)], self.pad_id))
        return out


class CurriculumSampler:
    """The pretraining train sampler in curriculum order: `global_batch` fixed windows per step (WindowSampler's API)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch: int, schedule: Schedule):
        self.tokens, self.seq_len, self.global_batch, self.schedule = tokens, seq_len, global_batch, schedule
        self._offsets = np.arange(seq_len + 1)

    def starts(self, step: int) -> np.ndarray:
        return self.schedule.indices(step, self.global_batch) * self.seq_len

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        idx = self.starts(step)[lo:hi, None] + self._offsets
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def n_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Fixed windows of seq_len + 1 tokens at k·seq_len that fit in `tokens`."""
    return (len(tokens) - 1) // seq_len


# ---- scores ------------------------------------------------------------------------------------------

def model_fingerprint(spec: str) -> str:
    """The model a spec names, for cache keys: its kind and path, and its (base's) weight files' sizes and mtimes."""
    from lmforge.model.load import resolve

    r = resolve(spec)
    parts = [r.kind, r.path]
    for res in (r, r.base):
        if res is None:
            continue
        p = Path(res.path)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in (".safetensors", ".bin", ".gguf")) \
            if p.is_dir() else []
        parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files]
    return "\n".join(parts)


def cached_scores(out_dir: Path, key: str, what: str, compute, rt) -> np.ndarray:
    """Scores from out_dir/curriculum-<hash of key>.npy, computed (rank 0) and written there when absent."""
    from lmforge.train.distributed import barrier

    path = out_dir / f"curriculum-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"
    if rt.is_main and not path.is_file():
        t0 = time.perf_counter()
        scores = np.asarray(compute(), dtype=np.float64)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")  # writers in other runs never share it
        np.save(tmp, scores)
        os.replace(tmp, path)
        print(f"curriculum: scored {len(scores)} {what} in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    elif rt.is_main:
        print(f"curriculum: reusing the scores in {path}", flush=True)
    barrier(rt)
    return np.load(path)


def load_reference(spec: str, device: torch.device, vocab_size: int):
    """The reference model in eval mode (fp32), checked to cover the run's token ids."""
    import torch

    from lmforge.model.load import load_model

    model = load_model(spec, dtype=torch.float32, device=device, merge_adapter=True).eval()
    if model.config.vocab_size < vocab_size:
        raise UserError(f"curriculum.reference_model {spec} has vocab_size {model.config.vocab_size}, the data's "
                        f"token ids go to {vocab_size - 1}; score with a model of the run's tokenizer")
    return model


def example_nll(model, examples: list[Example], device: torch.device) -> np.ndarray:
    """Each example's mean NLL over its target tokens; examples share padding-free rows of up to SCORE_TOKENS."""
    import torch
    import torch.nn.functional as F

    out, i = np.zeros(len(examples)), 0
    with torch.no_grad():
        while i < len(examples):
            j, used = i, 0
            while j < len(examples) and (j == i or used + len(examples[j]) <= SCORE_TOKENS):
                used += len(examples[j])
                j += 1
            batch = collate(examples, [np.arange(i, j)], pad_id=0)
            logits = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                           use_cache=False).logits[0].float()
            y = batch["targets"][0].to(device)
            nll, has = F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="none").cpu(), (y != IGNORE).cpu()
            x = 0
            for k in range(i, j):
                n = len(examples[k])
                out[k] = float(nll[x:x + n].sum() / has[x:x + n].sum().clamp(min=1))
                x += n
            i = j
    return out


def window_nll(model, tokens: np.ndarray, seq_len: int, device: torch.device) -> np.ndarray:
    """Each fixed window's mean next-token NLL."""
    import torch
    import torch.nn.functional as F

    n, offsets, out = n_windows(tokens, seq_len), np.arange(seq_len + 1), []
    with torch.no_grad():
        for lo in range(0, n, SCORE_WINDOWS):
            idx = (np.arange(lo, min(lo + SCORE_WINDOWS, n)) * seq_len)[:, None] + offsets
            chunk = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            logits = model(input_ids=chunk[:, :-1], use_cache=False).logits.float()
            nll = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].reshape(-1), reduction="none")
            out.append(nll.view(len(idx), seq_len).mean(1).cpu().numpy())
    return np.concatenate(out)


def sft_curriculum(cur: CurriculumConfig, examples: list[Example], tokenizer, base_model: str, seed: int,
                   packing: bool, max_length: int, pad_id: int, max_steps: int, out_dir: Path, rt) -> CurriculumBatches:
    """The fine-tuning `train_batches` in curriculum order (field scores come on the examples from load_sft_data)."""
    if cur.difficulty == "length":
        scores = np.array([len(ex) for ex in examples], dtype=np.float64)
    elif cur.difficulty == "field":
        scores = np.array([ex.difficulty for ex in examples], dtype=np.float64)
    else:
        from lmforge.model.load import load_tokenizer

        ref = cur.reference_model or base_model
        if ref != base_model and load_tokenizer(ref).get_vocab() != tokenizer.get_vocab():
            raise UserError(f"curriculum.reference_model {ref} has another tokenizer than base_model {base_model}; "
                            "perplexity scores need the run's token ids")
        digest = hashlib.sha256()
        for ex in examples:
            digest.update(ex.input_ids.tobytes() + ex.targets.tobytes() + b"|")
        key = f"perplexity sft\n{digest.hexdigest()}\n{model_fingerprint(ref)}"
        scores = cached_scores(out_dir, key, f"examples by perplexity under {ref}",
                               lambda: example_nll(load_reference(ref, rt.device, len(tokenizer)), examples,
                                                   rt.device), rt)
    schedule = Schedule(ranked(scores, cur.order, seed), cur.order, cur.c0, cur.competence_steps or max_steps, seed)
    return CurriculumBatches(examples, schedule, packing, max_length, pad_id)


def window_curriculum(cur: CurriculumConfig, tokens: np.ndarray, seq_len: int, global_batch: int, seed: int,
                      max_steps: int, vocab_size: int, out_dir: Path, rt) -> CurriculumSampler:
    """The pretraining train sampler in curriculum order, windows scored by the reference model's perplexity."""
    n = n_windows(tokens, seq_len)
    if n < 1:
        raise UserError(f"the shard has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    digest = hashlib.sha256(f"{seq_len} {len(tokens)} {tokens.dtype}".encode())
    for lo in range(0, len(tokens), 1 << 24):
        digest.update(np.ascontiguousarray(tokens[lo:lo + (1 << 24)]).tobytes())
    ref = cur.reference_model
    key = f"perplexity windows\n{digest.hexdigest()}\n{model_fingerprint(ref)}"
    scores = cached_scores(out_dir, key, f"windows of {seq_len + 1} tokens by perplexity under {ref}",
                           lambda: window_nll(load_reference(ref, rt.device, vocab_size), tokens, seq_len,
                                              rt.device), rt)
    schedule = Schedule(ranked(scores, cur.order, seed), cur.order, cur.c0, cur.competence_steps or max_steps, seed)
    return CurriculumSampler(tokens, seq_len, global_batch, schedule)
