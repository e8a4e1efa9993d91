"""Atomic checkpoints: model files (an HF model directory or a PEFT adapter) plus trainer_state.pt.

A checkpoint is written into a temporary directory, fsynced, renamed to `step-NNNNNNN`, and only
then is `latest` replaced (itself via a temp file and os.replace), so a process killed at any
moment leaves `latest` naming a complete checkpoint. trainer_state.pt holds only tensors and
plain Python values and is read with `weights_only=True`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from lmforge.runs import latest_checkpoint, point_latest, step_dir_name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_model_dir(path: Path, hf_state: dict[str, torch.Tensor], hf_config: dict, tokenizer_dir: Path | None,
                    eos_id: int | None) -> None:
    """An HF model directory: config.json, model.safetensors, generation_config.json, tokenizer files."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in hf_state.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": True, "temperature": 0.8, "top_k": 200}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                shutil.copy2(f, path / f.name)


def save_checkpoint(ckpt_root: Path, step: int, write_model: Callable[[Path], None], trainer_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune to the newest `keep_last`.

    `write_model(dir)` writes the model files (the stage decides: full weights or an adapter).
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_dir_name(step)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_model(tmp)
    torch.save(trainer_state, tmp / "trainer_state.pt")
    for f in tmp.rglob("*"):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a rerun after rollback can reach the same step again
        shutil.rmtree(final)
    os.rename(tmp, final)
    point_latest(ckpt_root, final)
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)
    return final


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of killed writes."""
    for leftover in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    latest = latest_checkpoint(ckpt_root)
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in steps[:-keep_last]:
        if latest is None or old.resolve() != latest.resolve():
            shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(path: Path) -> dict:
    """The trainer state of a checkpoint directory; no pickled code is run."""
    return torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)

