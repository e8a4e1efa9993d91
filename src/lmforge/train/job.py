"""What a stage hands the training engine: the `Job` (model, objective, batches, export) and the `RunSpec`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn

from lmforge.train.config import GuardConfig, LogConfig, TrainConfig
from lmforge.train.metrics import StepMetrics

Batch = Any
# objective(model, micro_batch) -> (mean loss over the micro-batch's tokens, number of tokens)
Objective = Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]


@dataclass
class Job:
    """What a stage hands the engine."""

    model: nn.Module
    objective: Objective
    # (step, micro_batch_size, grad_accum, rank, world_size) -> this rank's micro-batches of that step
    train_batches: Callable[[int, int, int, int, int], Iterable[Batch]]
    # (micro_batch_size, rank, world_size) -> this rank's share of the fixed validation batches
    eval_batches: Callable[[int, int, int], Iterable[Batch]] | None
    # (checkpoint dir, model state dict) -> write the model files (full weights in HF format, or an adapter). The
    # state dict may be a lazy Mapping (read from a sharded checkpoint tensor by tensor): stream it or dict() it.
    save_model: Callable[[Path, Mapping], None]
    load_model: Callable[[Path], dict]  # checkpoint dir -> model state dict (what save_model was given)
    # Tokens per global step when fixed (pretraining windows); otherwise batch_tokens counts each micro-batch.
    tokens_per_step: int | None = None
    batch_tokens: Callable[[Batch], int] | None = None
    trainable_only: bool = False  # checkpoints hold only trainable parameters (LoRA: the base is frozen)
    blocks: list[nn.Module] = field(default_factory=list)  # FSDP wrapping units
    flops_per_token: float | None = None
    # An objective's own numbers (DPO's rewards/margins, a reward model's accuracy, rollout rewards): it adds
    # them here; the engine writes their means into the next train line and into each eval line.
    metrics: StepMetrics | None = None
    # An objective's own state that is not a tensor of the model (PPO's adaptive KL coefficient): (get, set) of a
    # dict of plain values, kept in trainer_state.pt.
    extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None


@dataclass
class RunSpec:
    """Where the run writes, whether it resumes, and its config sections (stored in every checkpoint)."""

    out_dir: Path
    resume: str
    train: TrainConfig
    guards: GuardConfig
    log: LogConfig
    config_dump: dict = field(default_factory=dict)
    deepspeed: dict | None = None  # the ds_config DeepSpeed's engine runs (train.deepspeed.deepspeed_plan); None: ours
