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
    ds: object | None = None  # DeepSpeed's engine, when a ds_config runs on it (train/deepspeed_engine.py)

    @property
    def skips_on_device(self) -> bool:
        """Whether a guarded update is skipped with no host read: a fused AdamW takes the verdict as `found_inf`;
        fp16's GradScaler hands it its own."""
        if self.ds is not None:
            from lmforge.train.deepspeed_engine import skips_on_device
            return skips_on_device(self.ds)
        return bool(self.optimizer.defaults.get("fused")) and not self.scaler.is_enabled()


def build_engine(model: nn.Module, blocks: list[nn.Module], tc: TrainConfig, guards: GuardConfig, rt: Runtime,
                 precision: str, ds_config: dict | None = None) -> Engine:
    """Move `model` to the device, wrap it for DDP/FSDP/HSDP (CPU offload too), and build its AdamW, GradScaler and
    StepGuard; or hand it to DeepSpeed's engine when `ds_config` is given (the ds_config runs on DeepSpeed)."""
    device = rt.device
    if tc.grad_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):  # transformers (and PEFT-wrapped) models
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing = True
    if ds_config is not None:
        return _deepspeed_engine(model, tc, guards, rt, precision, ds_config)
    model = _place(model, device, tc.cpu_offload)
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


def _deepspeed_engine(model: nn.Module, tc: TrainConfig, guards: GuardConfig, rt: Runtime, precision: str,
                      ds_config: dict) -> Engine:
    """The Engine over DeepSpeed's: its module is what the objective calls, its ZeRO optimizer what the LR is set on.

    lmforge features DeepSpeed's engine cannot honour are one-line errors here, before any step.
    """
    from lmforge.train import deepspeed_engine as dse
    if tc.compile:
        raise ConfigError("train.compile=true is not wired for DeepSpeed's engine; set it to false, or run the "
                          f"ds_config on FSDP2 ({dse.ENGINE_ENV}=0)")
    if tc.async_checkpoint:
        raise ConfigError("train.async_checkpoint=true: DeepSpeed's engine writes its checkpoints itself, in the "
                          f"foreground; set it to false, or run the ds_config on FSDP2 ({dse.ENGINE_ENV}=0)")
    if guards.spike_factor > 0 and dse.offloads_optimizer(ds_config):
        raise ConfigError("guards.spike_factor needs an update that can be skipped, and DeepSpeedCPUAdam "
                          "(zero_optimization.offload_optimizer) cannot skip one; set guards.spike_factor=0, or "
                          "drop the optimizer offload")
    ds = dse.initialize(model, tc, ds_config, rt, precision)
    params = [p for p in ds.module.parameters() if p.requires_grad]
    return Engine(ds, ds, ds.optimizer, torch.amp.GradScaler(rt.device.type, enabled=False), StepGuard(guards),
                  params, precision, rt.device, ds=ds)


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
