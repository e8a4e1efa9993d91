"""Run directories and the `latest` checkpoint pointer.

A run is an `out_dir` holding `checkpoints/step-NNNNNNN/` directories and a `checkpoints/latest`
file naming the newest complete one. Training writes them (train/checkpoint.py); the model
loader reads them, so `lmforge generate RUN` loads the run's latest checkpoint. Both import this
module, which imports neither.
"""
from __future__ import annotations

import os
from pathlib import Path

CHECKPOINTS = "checkpoints"
LATEST = "latest"


def checkpoints_dir(out_dir: str | Path) -> Path:
    """Where a run keeps its checkpoints."""
    return Path(out_dir) / CHECKPOINTS


def is_run(path: str | Path) -> bool:
    """Whether `path` is a run's out_dir (it has a checkpoints/ directory)."""
    return checkpoints_dir(path).is_dir()


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when there is none yet."""
    ckpt_root = Path(ckpt_root)
    pointer = ckpt_root / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_root / pointer.read_text().strip()
    if not (path / "trainer_state.pt").is_file():  # written last, inside a directory renamed into place
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def point_latest(ckpt_root: str | Path, checkpoint: Path) -> None:
    """Make `latest` name `checkpoint`, atomically (temp file, fsync, rename)."""
    ckpt_root = Path(ckpt_root)
    tmp = ckpt_root / f".{LATEST}.tmp"
    tmp.write_text(checkpoint.name + "\n")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, ckpt_root / LATEST)
