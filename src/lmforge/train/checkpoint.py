"""Atomic checkpoints: model files (an HF model directory or a PEFT adapter) plus trainer_state.pt.

A checkpoint is written into a temporary directory, fsynced, renamed to `step-NNNNNNN`, and only
then is `latest` replaced (itself via a temp file and os.replace), so a process killed at any
moment leaves `latest` naming a complete checkpoint. trainer_state.pt holds only tensors and
plain Python values and is read with `weights_only=True`. The `Checkpointer` decides what goes
into it (optimizer, scaler, guard, RNG, the loop's counters) and puts it back on resume and rollback.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from lmforge.runs import latest_checkpoint, point_latest, step_dir_name
from lmforge.train.distributed import Runtime, barrier
from lmforge.train.job import Job
from lmforge.train.metrics import MetricsLogger
from lmforge.train.state import Engine, TrainState


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


def resume_path(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint a run resumes from: `latest` under "auto", none under "never", else the directory named."""
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    if resume != "never":
        return Path(resume)
    return None


@dataclass
class Checkpointer:
    """Saves a run's checkpoints under `root` and puts one back, for resume and for rollback."""

    root: Path
    job: Job
    engine: Engine
    rt: Runtime
    logger: MetricsLogger
    keep_last: int
    config: dict  # the resolved run config, stored in every trainer_state.pt

    def save(self, state: TrainState) -> Path | None:
        """Checkpoint step `state.step`; every rank gathers the full state dicts, rank 0 writes and gets the path."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        model, opt = self.engine.model, self.engine.optimizer
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=self.job.trainable_only)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, opt, options=opts)
        path = None
        if self.rt.is_main:
            path = save_checkpoint(self.root, state.step, lambda d: self.job.save_model(d, msd),
                                   self._trainer_state(state, osd), self.keep_last)
            self.logger.event(state.step, "checkpoint", str(path))
        barrier(self.rt)
        return path

    def _trainer_state(self, state: TrainState, optimizer_state: dict) -> dict:
        """What trainer_state.pt holds: tensors and plain values only, so it loads with weights_only=True."""
        scaler, device = self.engine.scaler, self.engine.device
        return {
            "step": state.step, "optimizer": optimizer_state,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "guard": self.engine.guard.state_dict(),
            "lr_scale": state.lr_scale, "micro_batch_size": state.micro_batch_size, "grad_accum": state.grad_accum,
            "data_position": state.step, "world_size": self.rt.world_size,
            "elapsed_s": state.elapsed(), "tokens": state.tokens,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "config": self.config,
        }

    def restore(self, path: Path) -> dict:
        """Load checkpoint `path` into the model, optimizer, scaler, guard and RNG; returns its trainer state."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        engine = self.engine
        saved = load_trainer_state(path)
        opts = StateDictOptions(full_state_dict=True, strict=not self.job.trainable_only)
        set_model_state_dict(engine.model, self.job.load_model(path), options=opts)
        set_optimizer_state_dict(engine.model, engine.optimizer, saved["optimizer"], options=opts)
        if saved.get("scaler"):
            engine.scaler.load_state_dict(saved["scaler"])
        engine.guard.load_state_dict(saved["guard"])
        torch.set_rng_state(saved["rng"]["torch"])
        if engine.device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], engine.device)
        return saved

    def resume(self, path: Path, state: TrainState) -> None:
        """Continue a run from checkpoint `path`: restore it and take its loop counters into `state`."""
        saved = self.restore(path)
        state.step, state.lr_scale = int(saved["step"]), float(saved["lr_scale"])
        state.micro_batch_size, state.grad_accum = int(saved["micro_batch_size"]), int(saved["grad_accum"])
        state.elapsed_before = float(saved.get("elapsed_s", 0.0))
        state.tokens = float(saved.get("tokens", 0.0))
        world = self.rt.world_size
        if saved.get("world_size", world) != world:
            self.logger.event(state.step, "world_size_changed",
                              f"checkpoint written by {saved['world_size']} processes, resumed on {world}")
        self.logger.event(state.step, "resumed", f"from {path}")
        self._show_step(state.step)

    def roll_back(self, state: TrainState, lr_factor: float) -> Path | None:
        """Go back to the latest checkpoint with the learning rate scaled by `lr_factor`; None when there is none.

        Of the loop's counters only the step comes back. The guard keeps its rollback count (so guards.max_rollbacks
        bounds them), the micro-batch size stays as a CUDA OOM left it, and rolled-back tokens stay counted.
        """
        last = latest_checkpoint(self.root)
        if last is None:
            return None
        rollbacks = self.engine.guard.rollbacks
        saved = self.restore(last)
        self.engine.guard.rollbacks = rollbacks
        state.lr_scale *= lr_factor
        state.step = int(saved["step"])
        self.logger.event(state.step, "rollback", f"to {last.name}, learning rate x{state.lr_scale:g}")
        self._show_step(state.step)
        return last

    def _show_step(self, step: int) -> None:
        if self.logger.bar:
            self.logger.bar.n = step
