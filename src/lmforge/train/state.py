"""What a run holds while it trains: the objects it trains with (`Engine`) and the loop's counters (`TrainState`).

The components (checkpointer, step, evaluator) read and write these two instead of sharing a
closure's locals, so each can be read alone.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.config import ConfigError
from lmforge.train.config import GuardConfig, TrainConfig
from lmforge.train.distributed import Runtime, wrap_model
from lmforge.train.guards import StepGuard
from lmforge.train.optim import build_adamw


@dataclass
class Engine:
    """The model, optimizer, scaler and guard of one run, built once on its device."""

    model: nn.Module  # wrapped for DDP/FSDP: what state dicts, gradient sync and train()/eval() act on
    forward: nn.Module  # what objectives call: the model, or its torch.compile'd form
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: StepGuard
    params: list[nn.Parameter]  # the trainable parameters, clipped together
    precision: str  # "bf16", "fp16" or "fp32", already resolved for the device
    device: torch.device

    @property
    def skips_on_device(self) -> bool:
        """Whether a guarded update is skipped with no host read: a fused AdamW takes the verdict as `found_inf`;
        fp16's GradScaler hands it its own."""
        return bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()


def build_engine(model: nn.Module, blocks: list[nn.Module], tc: TrainConfig, guards: GuardConfig, rt: Runtime,
                 precision: str) -> Engine:
    """Move `model` to the device, wrap it for DDP/FSDP/HSDP (CPU offload too), and build its AdamW, GradScaler and StepGuard."""
    device = rt.device
    model = _place(model, device, tc.cpu_offload)
    if tc.grad_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):  # transformers (and PEFT-wrapped) models
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing = True
    sharded = tc.parallel in ("fsdp", "hsdp")
    mp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if sharded else None
    if tc.cpu_offload and not rt.distributed:
        raise ConfigError("train.cpu_offload=true offloads FSDP2 shards and needs several processes "
                          "(torchrun --nproc_per_node N); set it to false for one process")
    model = wrap_model(model, rt, tc.parallel, blocks, mp_dtype, tc.cpu_offload, tc.shard_degree,
                       tc.reshard_after_forward)
    opt = build_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    forward = torch.compile(model) if tc.compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    return Engine(model, forward, opt, scaler, StepGuard(guards), params, precision, device)


def _place(model: nn.Module, device: torch.device, cpu_offload: bool) -> nn.Module:
    """The model on `device`; under CPU offload only its buffers (RoPE tables, masks), since FSDP2 wants the
    parameters it offloads on the CPU before sharding and copies them to the device for each forward itself."""
    if not cpu_offload:
        return model.to(device)
    model = model.to("cpu")
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)
    return model


@dataclass
class TrainState:
    """The loop's counters, read and written by the components; trainer_state.pt holds all but the last two."""

    micro_batch_size: int  # halved on a CUDA OOM, with grad_accum doubled, so the global batch stays
    grad_accum: int
    step: int = 0  # optimizer steps done
    lr_scale: float = 1.0  # multiplied by guards.rollback_lr_factor at each rollback
    tokens: float = 0.0  # tokens trained on, over all ranks and all processes of this run
    elapsed_before: float = 0.0  # seconds trained by earlier processes of this run (from the checkpoint)
    started: float = 0.0  # time.perf_counter() when this process's loop began
    oom_hooks_fired: set[int] = field(default_factory=set)  # debug_oom_steps fire once per process, not on a replay

    def start_clock(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        """Seconds trained by this run so far, earlier processes included."""
        return self.elapsed_before + ((time.perf_counter() if now is None else now) - self.started)
