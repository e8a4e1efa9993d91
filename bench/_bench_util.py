"""Helpers shared by the bench scripts."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def stderr_to(path: Path):
    """datatrove's workers log every step through loguru to fd 2: send it to a file instead."""
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
