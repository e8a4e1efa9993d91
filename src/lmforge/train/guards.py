"""Step guards: decide from a step's loss and gradient norm whether to apply, skip, roll back or stop.

The skip is decided on the device (`verdict`, `accept`) so that a GPU step never waits for the host; the
counters that lead to a rollback or a stop are kept on the host (`record`), replayed from the steps' values
when the loop next reads them (once per logged step).
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import torch

from lmforge.train.config import GuardConfig

REASONS = (None, "nonfinite", "spike")  # a verdict's code indexes this


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says what happened and what to try."""


@dataclass
class StepGuard:
    cfg: GuardConfig
    recent: deque = field(default_factory=deque)  # losses of the last spike_window kept steps, oldest first
    bad_in_a_row: int = 0
    rollbacks: int = 0
    seen: int = 0  # kept steps
    # The device's copy of `recent` (a ring of spike_window slots, NaN where empty) and of `seen`, built from
    # them when first needed: `record` catches the host up with `accept` later.
    _window: torch.Tensor | None = field(default=None, repr=False)
    _seen: torch.Tensor | None = field(default=None, repr=False)

    def verdict(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """0 when the update is fine, else the index in REASONS of why to skip it, as a 0-d tensor on the loss's device.

        A non-finite loss or norm comes first; a spike is a loss above spike_factor x the median of the recent kept
        losses (the mean of the middle two for an even count), once spike_warmup steps were kept.
        """
        code = torch.zeros((), dtype=torch.int64, device=loss.device)
        if self.cfg.spike_factor > 0:
            window, seen = self._device_state(loss)
            n = seen.clamp(max=window.numel())
            ordered = torch.where(window.isnan(), math.inf, window).sort().values
            lo = ordered.index_select(0, ((n - 1).clamp(min=0) // 2).view(1))
            hi = ordered.index_select(0, (n // 2).clamp(max=window.numel() - 1).view(1))
            median = ((lo + hi) / 2).squeeze(0)
            spike = (seen >= self.cfg.spike_warmup) & (n > 0) & (loss > self.cfg.spike_factor * median)
            code = torch.where(spike, 2, code)
        if self.cfg.skip_nonfinite:
            code = torch.where(loss.isfinite() & grad_norm.to(loss.device).isfinite(), code, 1)
        return code

    def accept(self, loss: torch.Tensor, skipped: torch.Tensor) -> None:
        """Put a kept step's loss into the device window (a skipped step leaves it as it was)."""
        if self.cfg.spike_factor <= 0:
            return
        window, seen = self._device_state(loss)
        slot = (seen % window.numel()).view(1)
        window.index_copy_(0, slot, torch.where(skipped, window.index_select(0, slot), loss.to(window.dtype)))
        seen += (~skipped).to(seen.dtype)

    def _device_state(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._window is None:
            size = self.cfg.spike_window
            window = torch.full((size,), math.nan, dtype=like.dtype)
            for i, value in enumerate(self.recent):  # the oldest kept loss sits where the next one will go
                window[(self.seen - len(self.recent) + i) % size] = value
            self._window = window.to(like.device)
            self._seen = torch.tensor(self.seen, dtype=torch.int64, device=like.device)
        return self._window, self._seen

    def record(self, loss: float, skipped: bool) -> str | None:
        """Update the host's counters with one step; returns "rollback" or "stop" after too many bad steps in a row."""
        if skipped:
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                if self.cfg.on_repeated_bad == "rollback" and self.rollbacks < self.cfg.max_rollbacks:
                    self.rollbacks += 1
                    self.bad_in_a_row = 0
                    return "rollback"
                return "stop"
            return None
        self.bad_in_a_row = 0
        self.seen += 1
        self.recent.append(loss)
        while len(self.recent) > self.cfg.spike_window:
            self.recent.popleft()
        return None

    def state_dict(self) -> dict:
        return {"recent": list(self.recent), "bad_in_a_row": self.bad_in_a_row, "rollbacks": self.rollbacks,
                "seen": self.seen}

    def load_state_dict(self, s: dict) -> None:
        self.recent = deque(float(x) for x in s["recent"])
        self.bad_in_a_row, self.rollbacks, self.seen = int(s["bad_in_a_row"]), int(s["rollbacks"]), int(s["seen"])
        self._window = self._seen = None  # rebuilt from these on the next verdict
