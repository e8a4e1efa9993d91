"""Atomic checkpoints, in one of three formats that load through one function (`Checkpointer.restore`).

- full (one process): the model files (an HF model directory or a PEFT adapter) plus trainer_state.pt
  holding the optimizer state too.
- sharded (several processes, or `train.async_checkpoint`): torch.distributed.checkpoint (DCP), as torchtitan
  does. Every rank writes its own shards of the model and optimizer into `dcp/`, and no rank gathers the whole
  state; on resume DCP reshards to whatever the new world size is (2 -> 1, 1 -> 2, ...). trainer_state.pt holds
  the rest. The HF model files are written at the end of a run, streamed tensor by tensor from the shards,
  and by `lmforge export RUN` (model/sharded.py reads them).
- deepspeed (a ds_config on DeepSpeed's engine): DeepSpeed's own partitions under `deepspeed/`, every rank its
  own, resumed on the same number of processes; the final checkpoint gets the HF model files too.

A checkpoint is written into a temporary directory, fsynced, renamed to `step-NNNNNNN`, and only
then is `latest` replaced (itself via a temp file and os.replace), so a process killed at any
moment leaves `latest` naming a complete checkpoint. trainer_state.pt holds only tensors and
plain Python values and is read with `weights_only=True`. The `Checkpointer` decides what goes
into it (optimizer, scaler, guard, RNG, the loop's counters) and puts it back on resume and rollback.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from lmforge.model.sharded import DCP_DIR, ShardedWeights, is_sharded, load_sharded
from lmforge.errors import UserError
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


def save_checkpoint(ckpt_root: Path, step: int, write_model: Callable[[Path], None], trainer_state: dict,
                    keep_last: int) -> Path:
    """Write checkpoint `step` atomically, point `latest` at it, and prune to the newest `keep_last`.

    `write_model(dir)` writes the model files (the stage decides: full weights or an adapter).
    """
    tmp = fresh_tmp_dir(ckpt_root, step, os.getpid())
    write_model(tmp)
    return publish_checkpoint(tmp, ckpt_root, step, trainer_state, keep_last)


def fresh_tmp_dir(ckpt_root: Path, step: int, tag: object) -> Path:
    """An empty directory to write checkpoint `step` into before it is published."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".tmp-{step_dir_name(step)}-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish_checkpoint(tmp: Path, ckpt_root: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Add trainer_state.pt to the written `tmp`, fsync it all, rename it to step-N and point `latest` at it."""
    final = ckpt_root / step_dir_name(step)
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


IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")  # optimizer flags that are not hyperparameters


@dataclass
class _Pending:
    """A sharded checkpoint being written in the background, published once every rank has finished it."""

    future: object
    tmp: Path
    step: int
    trainer_state: dict


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
    async_save: bool = False  # sharded checkpoints written in the background (train.async_checkpoint)
    pending: _Pending | None = None
    _pg: object = None  # the process group background saves plan over, apart from training's collectives

    @property
    def sharded(self) -> bool:
        """Whether this run writes sharded (DCP) checkpoints: several processes, or background saving."""
        return self.rt.distributed or self.async_save

    @property
    def format(self) -> str:
        """What this run's checkpoints hold: "deepspeed" (DeepSpeed's engine), "sharded" (DCP) or "full"."""
        return "deepspeed" if self.engine.ds is not None else "sharded" if self.sharded else "full"

    def _options(self, full: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        trainable = self.job.trainable_only
        return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=trainable,
                                strict=not trainable)

    def _state_dicts(self, full: bool) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        model, opt = self.engine.model, self.engine.optimizer
        opts = self._options(full)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, opt, options=opts)

    def save(self, state: TrainState, final: bool = False) -> Path | None:
        """Checkpoint step `state.step`; rank 0 gets the path (None on the others, and while a save is in flight).

        `final` (the end of the run): a sharded checkpoint is written in the foreground and gets the HF model
        files too, so every run ends with a directory that the other stages load.
        """
        if self.engine.ds is not None:
            return self._save_deepspeed(state, final)
        if not self.sharded:
            msd, osd = self._state_dicts(full=True)  # gathered onto every rank's CPU; rank 0 writes
            path = None
            if self.rt.is_main:
                path = save_checkpoint(self.root, state.step, lambda d: self.job.save_model(d, msd),
                                       self._trainer_state(state, osd), self.keep_last)
                self.logger.event(state.step, "checkpoint", str(path))
            barrier(self.rt)
            return path
        return self._save_sharded(state, final)

    def _save_deepspeed(self, state: TrainState, final: bool) -> Path | None:
        """DeepSpeed's engine writes its own partitions (every rank) under `deepspeed/`; the final one gets the HF
        model files too, gathered from the fp32 master weights parameter by parameter."""
        from lmforge.train import deepspeed_engine as dse
        tmp = self.root / f".tmp-{step_dir_name(state.step)}-deepspeed"
        if self.rt.is_main:
            fresh_tmp_dir(self.root, state.step, "deepspeed")
        barrier(self.rt)
        dse.save(self.engine.ds, tmp, {"step": state.step})
        if final:
            weights = dse.full_state_dict(self.engine.ds)  # a collective: every rank takes part
            if self.rt.is_main:
                self.job.save_model(tmp, weights)
        return self._publish(tmp, state.step, self._trainer_state(state, {}))

    def _save_sharded(self, state: TrainState, final: bool) -> Path | None:
        import torch.distributed.checkpoint as dcp
        self.finish_pending()
        msd, osd = self._state_dicts(full=False)  # each rank's own shards (DTensors under FSDP)
        # The optimizer's tensors go to DCP; its param_groups (plain numbers, the same on every rank) to
        # trainer_state.pt, so the shards hold tensors only and load without unpickling anything.
        trainer_state = self._trainer_state(state, {"param_groups": osd["param_groups"]})
        tmp = self.root / f".tmp-{step_dir_name(state.step)}-sharded"  # one name on every rank (a shared filesystem)
        if self.rt.is_main:
            fresh_tmp_dir(self.root, state.step, "sharded")
        barrier(self.rt)
        shards = {"model": msd, "optim": {"state": osd["state"]}}
        writer = dcp.FileSystemWriter(str(tmp / DCP_DIR))
        if self.async_save and not final:
            if self.rt.distributed and self._pg is None:
                import torch.distributed as dist
                self._pg = dist.new_group(backend="gloo")
            future = dcp.async_save(shards, storage_writer=writer, process_group=self._pg,
                                    no_dist=not self.rt.distributed)
            self.pending = _Pending(future, tmp, state.step, trainer_state)
            return None
        dcp.save(shards, storage_writer=writer, no_dist=not self.rt.distributed)
        if final and self.rt.is_main:
            self.job.save_model(tmp, ShardedWeights(tmp, "model"))
        return self._publish(tmp, state.step, trainer_state)

    def finish_pending(self) -> None:
        """Wait for a background save to be written on every rank, then publish it (a no-op when none is)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        pending.future.result()
        self._publish(pending.tmp, pending.step, pending.trainer_state)

    def _publish(self, tmp: Path, step: int, trainer_state: dict) -> Path | None:
        barrier(self.rt)  # every rank's shards are on disk
        path = None
        if self.rt.is_main:
            path = publish_checkpoint(tmp, self.root, step, trainer_state, self.keep_last)
            self.logger.event(step, "checkpoint", str(path))
        barrier(self.rt)
        return path

    def _trainer_state(self, state: TrainState, optimizer_state: dict) -> dict:
        """What trainer_state.pt holds: tensors and plain values only, so it loads with weights_only=True."""
        scaler, device = self.engine.scaler, self.engine.device
        return {
            "step": state.step, "optimizer": optimizer_state, "format": self.format,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "guard": self.engine.guard.state_dict(),
            "lr_scale": state.lr_scale, "micro_batch_size": state.micro_batch_size, "grad_accum": state.grad_accum,
            "data_position": state.step, "world_size": self.rt.world_size,
            "elapsed_s": state.elapsed(), "tokens": state.tokens,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "extra": self.job.extra_state[0]() if self.job.extra_state else None,
            "config": self.config,
        }

    def restore(self, path: Path) -> dict:
        """Load checkpoint `path` (either format, written by any number of processes) into the model, optimizer,
        scaler, guard and RNG; returns its trainer state."""
        engine = self.engine
        saved = load_trainer_state(path)
        by_deepspeed = saved.get("format") == "deepspeed"
        if by_deepspeed != (engine.ds is not None):
            written = "DeepSpeed's engine" if by_deepspeed else "lmforge's engine"
            raise UserError(f"{path} was written by {written} and this run trains on the other; resume it on the "
                            "engine that wrote it (the same deepspeed: config and LMFORGE_DEEPSPEED_ENGINE)")
        if engine.ds is not None:
            from lmforge.train.deepspeed_engine import load
            load(engine.ds, path)  # model, optimizer and ZeRO partitions
        else:
            self._load_model_and_optimizer(path, saved)
        if saved.get("scaler"):
            engine.scaler.load_state_dict(saved["scaler"])
        engine.guard.load_state_dict(saved["guard"])
        if self.job.extra_state and saved.get("extra") is not None:
            self.job.extra_state[1](saved["extra"])
        torch.set_rng_state(saved["rng"]["torch"])
        if engine.device.type == "cuda" and saved["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(saved["rng"]["cuda"], engine.device)
        return saved

    def _load_model_and_optimizer(self, path: Path, saved: dict) -> None:
        """Model and optimizer state from a full or sharded checkpoint, resharded to this run's processes."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        engine = self.engine
        if is_sharded(path):
            msd, osd = self._state_dicts(full=False)
            load_sharded({"model": msd, "optim": {"state": osd["state"]}}, path, self.rt.distributed)
            osd["param_groups"] = saved["optimizer"]["param_groups"]
            opts = self._options(full=False)
        else:
            msd, osd = self.job.load_model(path), saved["optimizer"]
            opts = self._options(full=True)
        set_model_state_dict(engine.model, msd, options=opts)
        # Hyperparameters come from the checkpoint; how the update runs (fused, foreach) is this process's choice:
        # a run saved fused on a GPU resumes with foreach on MPS, and the reverse (a run needs fused to skip a
        # guarded update on the device).
        for saved_group, group in zip(osd["param_groups"], engine.optimizer.param_groups):
            saved_group.update({k: group[k] for k in IMPLEMENTATION_KEYS if k in group})
        set_optimizer_state_dict(engine.model, engine.optimizer, osd, options=opts)

    def resume(self, path: Path, state: TrainState) -> None:
        """Continue a run from checkpoint `path`: restore it and take its loop counters into `state`."""
        saved = self.restore(path)
        state.step, state.lr_scale = int(saved["step"]), float(saved["lr_scale"])
        state.micro_batch_size, state.grad_accum = int(saved["micro_batch_size"]), int(saved["grad_accum"])
        state.elapsed_before = float(saved.get("elapsed_s", 0.0))
        state.tokens = float(saved.get("tokens", 0.0))
        world, saved_world = self.rt.world_size, int(saved.get("world_size", self.rt.world_size))
        if saved_world != world:
            # Keep the global batch (and so the windows of every step): the accumulation absorbs the change.
            global_batch = state.micro_batch_size * state.grad_accum * saved_world
            accum, rest = divmod(global_batch, state.micro_batch_size * world)
            if rest or not accum:
                raise UserError(f"{path} was written by {saved_world} processes with a global batch of {global_batch} "
                                f"(micro-batch {state.micro_batch_size}); it cannot be split over {world} processes; "
                                f"resume on a number of processes that divides {global_batch // state.micro_batch_size}")
            state.grad_accum = accum
            self.logger.event(state.step, "world_size_changed",
                              f"checkpoint written by {saved_world} processes, resumed on {world}: micro-batch "
                              f"{state.micro_batch_size} x grad_accum {accum} keeps the global batch {global_batch}")
        self.logger.event(state.step, "resumed", f"from {path}")
        self._show_step(state.step)

    def roll_back(self, state: TrainState, lr_factor: float) -> Path | None:
        """Go back to the latest checkpoint with the learning rate scaled by `lr_factor`; None when there is none.

        Of the loop's counters only the step comes back. The guard keeps its rollback count (so guards.max_rollbacks
        bounds them), the micro-batch size stays as a CUDA OOM left it, and rolled-back tokens stay counted.
        """
        self.finish_pending()
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
