"""Batches of token windows from shards: one global sampler, each rank takes its slice.

The windows of step s are a pure function of (seed, s): resuming needs only the step, and a
run on N processes sees exactly the windows a 1-process run with the same global batch sees.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lmforge.errors import UserError


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
