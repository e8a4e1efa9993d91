"""Batches of token windows from shards: one global sampler, each rank takes its slice.

The windows of step s are a pure function of (seed, s): resuming needs only the step, and a
run on N processes sees exactly the windows a 1-process run with the same global batch sees.
A mixture (`data.mix`) keeps this: the source of global window k is a pure function of (seed, k).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import UserError
from lmforge.train.metrics import StepMetrics

GOLDEN = (5 ** 0.5 - 1) / 2  # the Weyl step with the most even coverage of [0, 1)


@dataclass
class WindowSampler:
    """Draws `global_batch` windows of `seq_len + 1` tokens per step from a flat token array."""

    tokens: np.ndarray
    seq_len: int
    global_batch: int
    seed: int
    sampling: str = "random"  # random | sequential

    def __post_init__(self):
        self.n_windows = len(self.tokens) - self.seq_len - 1
        if self.n_windows < 1:
            raise UserError(f"the shard has {len(self.tokens)} tokens, fewer than one window of {self.seq_len + 1}")
        self._offsets = np.arange(self.seq_len + 1)

    def starts(self, step: int) -> np.ndarray:
        """Start offsets of the global batch of `step`."""
        if self.sampling == "sequential":
            # Non-overlapping windows in order; wraps around at the end of an epoch.
            per_epoch = max(1, (len(self.tokens) - 1) // self.seq_len)
            k = (step * self.global_batch + np.arange(self.global_batch)) % per_epoch
            return np.minimum(k * self.seq_len, self.n_windows - 1)
        g = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        return g.integers(0, self.n_windows, size=self.global_batch)

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each `hi - lo` x seq_len, int64) for windows lo:hi of step's global batch."""
        idx = self.starts(step)[lo:hi, None] + self._offsets
        chunk = torch.from_numpy(self.tokens[idx].astype(np.int64))
        return chunk[:, :-1], chunk[:, 1:]


def micro_batches(sampler: WindowSampler, step: int, micro_batch_size: int, grad_accum: int,
                  rank: int, world_size: int):
    """Yield this rank's `grad_accum` micro-batches of `step`.

    The global batch is laid out [micro 0 of rank 0, micro 0 of rank 1, ..., micro 1 of rank 0, ...]
    so every rank's share is a contiguous slice and the union over ranks is the whole batch.
    """
    for m in range(grad_accum):
        lo = (m * world_size + rank) * micro_batch_size
        yield sampler.batch(step, lo, lo + micro_batch_size)


class MixtureSampler:
    """Draws `global_batch` windows per step, each from one of several token sources chosen by weight.

    Why: the source of global window k = step * global_batch + j is picked by a Weyl sequence
    frac(u0(seed) + k * golden ratio) against the cumulative weights, a pure function of (seed, k)
    whose source fractions match the weights to O(log n / n) after n windows (a random draw would
    drift by O(1 / sqrt n)); the start within the source comes from Philox(seed, step). So resume,
    world-size independence and exact per-source token counts all follow from the step alone.
    """

    def __init__(self, sources: list, weights: list[float], seq_len: int, global_batch: int, seed: int,
                 names: list[str] | None = None):
        if len(sources) != len(weights) or not sources:
            raise UserError("a mixture needs one weight per source and at least one source")
        if any(not w > 0 for w in weights):
            raise UserError(f"mixture weights must be > 0, got {list(weights)}")
        self.sources, self.seq_len, self.global_batch, self.seed = sources, seq_len, global_batch, seed
        self.names = names or [str(i) for i in range(len(sources))]
        self.n_windows = np.array([len(t) - seq_len - 1 for t in sources], dtype=np.int64)
        for name, t, n in zip(self.names, sources, self.n_windows):
            if n < 1:
                raise UserError(f"mixture source {name} has {len(t)} tokens, fewer than one window of {seq_len + 1}")
        w = np.asarray(weights, dtype=np.float64)
        self.weights = w / w.sum()
        self._cum = np.cumsum(self.weights)
        self._cum[-1] = 1.0
        # The sequence's phase: from the seed, by a stream no step's Philox(seed, step) key can be.
        self._u0 = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0x6D6978]))).random()
        self._offsets = np.arange(seq_len + 1)
        self._counted_to, self._counts = 0, np.zeros(len(sources), dtype=np.int64)
        self.last_step: int | None = None

    def source_of(self, k: np.ndarray) -> np.ndarray:
        """The source index of each global window index in `k`."""
        u = np.modf(self._u0 + (np.asarray(k, dtype=np.int64) % 2 ** 40) * GOLDEN)[0]
        return np.searchsorted(self._cum, u, side="right").clip(max=len(self.sources) - 1)

    def starts(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source index, start offset in that source) of each window of `step`'s global batch."""
        src = self.source_of(step * self.global_batch + np.arange(self.global_batch))
        g = np.random.Generator(np.random.Philox(key=[self.seed, step]))
        return src, g.integers(0, self.n_windows[src])

    def batch(self, step: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (each `hi - lo` x seq_len, int64) for windows lo:hi of step's global batch."""
        self.last_step = step
        src, starts = self.starts(step)
        rows = [np.asarray(self.sources[s][st + self._offsets], dtype=np.int64) for s, st in zip(src[lo:hi], starts[lo:hi])]
        chunk = torch.from_numpy(np.stack(rows))
        return chunk[:, :-1], chunk[:, 1:]

    def window_counts(self, steps: int) -> np.ndarray:
        """Windows drawn from each source over the first `steps` steps (all ranks together)."""
        end = steps * self.global_batch
        if end < self._counted_to:
            self._counted_to, self._counts = 0, np.zeros_like(self._counts)
        while self._counted_to < end:  # in chunks, so a resume at step 10^6 stays cheap in memory
            k = np.arange(self._counted_to, min(end, self._counted_to + (1 << 22)))
            self._counts += np.bincount(self.source_of(k), minlength=len(self.sources))
            self._counted_to = int(k[-1]) + 1
        return self._counts.copy()

    def token_counts(self, steps: int) -> dict[str, int]:
        """Training tokens (seq_len per window) taken from each source over the first `steps` steps."""
        return {name: int(n) * self.seq_len for name, n in zip(self.names, self.window_counts(steps))}


class SourceTokens(StepMetrics):
    """The job's metrics hook for a mixture: each train line gets tokens/<source> totals so far.

    Why: per-source token counts belong in the run log next to the loss; they are exact because the
    sources of every step are a pure function of (seed, step).
    """

    def __init__(self, sampler: MixtureSampler):
        super().__init__()
        self.sampler = sampler

    def take(self, mode: str) -> dict[str, float]:
        out = super().take(mode)
        if mode == "train" and self.sampler.last_step is not None:
            out.update({f"tokens/{k}": v for k, v in self.sampler.token_counts(self.sampler.last_step + 1).items()})
        return out


def source_names(paths: list[str | Path]) -> list[str]:
    """Short, unique names for mixture sources: the directory name, or the whole path where names clash."""
    short = [Path(p).name or str(p) for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths)]


@dataclass
class PretrainData:
    """The token sources of a pretraining run (`data.dir`, or the directories of `data.mix`), memory-mapped.

    Why: pretrain.py asks one object for its metadata, train sampler, eval sampler and log hook,
    whichever layout (train.bin or a sharded corpus) and however many sources the config names.
    """

    meta: dict
    names: list[str]
    weights: list[float] | None  # None: the one source of data.dir
    train: list
    val: list
    sampling: str = "random"

    @classmethod
    def open(cls, data_cfg, vocab_size: int | None) -> PretrainData:
        """Read every source's meta (checked to share one vocabulary) and memory-map its splits."""
        from lmforge.tokens.shards import has_split, load_shard, read_meta

        if data_cfg.mix is None:
            paths, weights = [Path(data_cfg.dir)], None
        else:
            paths, weights = [Path(p) for p in data_cfg.mix], [float(w) for w in data_cfg.mix.values()]
        metas = [read_meta(p, vocab_size=vocab_size) for p in paths]
        for p, m in zip(paths[1:], metas[1:]):
            if (m["vocab_size"], m["eos_id"]) != (metas[0]["vocab_size"], metas[0]["eos_id"]):
                raise UserError(f"data.mix: {p} has vocab_size {m['vocab_size']} and eos_id {m['eos_id']}, "
                                f"{paths[0]} has {metas[0]['vocab_size']} and {metas[0]['eos_id']}; "
                                "tokenize every source with one tokenizer")
        train = [load_shard(p, "train", vocab_size) for p in paths]
        val = [load_shard(p, "val", vocab_size) if has_split(p, "val") else None for p in paths]
        return cls(metas[0], source_names(paths), weights, train, val, data_cfg.sampling)

    def has_val(self, seq_len: int) -> bool:
        """Whether every source has a val split of at least one window (else the run has no eval)."""
        return all(v is not None and len(v) > seq_len + 1 for v in self.val)

    def sampler(self, split: str, seq_len: int, global_batch: int, seed: int) -> WindowSampler | MixtureSampler:
        """The window sampler of `split`: a WindowSampler for one source, a MixtureSampler for a mixture."""
        tokens = self.train if split == "train" else self.val
        if self.weights is None:
            return WindowSampler(tokens[0], seq_len, global_batch, seed, self.sampling if split == "train" else "random")
        return MixtureSampler(tokens, self.weights, seq_len, global_batch, seed, self.names)
