"""Step guards: decide from a step's loss and gradient norm whether to apply, skip, roll back or stop."""
from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from lmforge.train.config import GuardConfig


class TrainingStopped(RuntimeError):
    """Training cannot go on; the message says what happened and what to try."""


@dataclass
class StepGuard:
    cfg: GuardConfig
    recent: deque = field(default_factory=deque)
    bad_in_a_row: int = 0
    rollbacks: int = 0
    seen: int = 0

    def check(self, loss: float, grad_norm: float) -> str | None:
        """None when the update is fine, else the reason to skip it ("nonfinite" or "spike")."""
        if self.cfg.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return "nonfinite"
        if (self.cfg.spike_factor > 0 and self.seen >= self.cfg.spike_warmup and self.recent
                and loss > self.cfg.spike_factor * statistics.median(self.recent)):
            return "spike"
        return None

    def record(self, loss: float, skipped: bool) -> str | None:
        """Update counters; returns "rollback" or "stop" after too many bad steps in a row."""
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
