"""One optimizer step: forward/backward over its micro-batches (with CUDA-OOM backoff), then the guarded update."""
from __future__ import annotations

import contextlib
import math

import torch

from lmforge.train.config import GuardConfig
from lmforge.train.distributed import Runtime, all_reduce_sum, no_grad_sync
from lmforge.train.guards import TrainingStopped
from lmforge.train.job import Job
from lmforge.train.metrics import MetricsLogger
from lmforge.train.state import Engine, TrainState


def autocast_for(precision: str, device: torch.device):
    """The autocast context for a resolved precision; fp32 runs without one."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def forward_backward(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig,
                     logger: MetricsLogger) -> tuple[float, float]:
    """Accumulate the gradients of step `state.step + 1`; returns its loss and token count over all ranks.

    A CUDA out-of-memory error halves the micro-batch and doubles accumulation (the same global batch) and retries.
    """
    while True:
        try:
            loss_sum, in_tokens = _accumulate(job, engine, state, rt, guards)
            break
        except torch.OutOfMemoryError as e:
            _back_off(engine, state, guards, logger, e)
    loss_sum, step_tokens = all_reduce_sum([loss_sum, float(in_tokens)], rt)
    if job.tokens_per_step is not None:
        step_tokens = job.tokens_per_step
    return loss_sum / (state.grad_accum * rt.world_size), step_tokens


def _accumulate(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig) -> tuple[float, int]:
    """Forward and backward over this rank's micro-batches; (sum of their losses, their tokens when counted)."""
    step = state.step
    loss_sum, in_tokens = 0.0, 0
    if step + 1 in guards.debug_oom_steps and step + 1 not in state.oom_hooks_fired:
        state.oom_hooks_fired.add(step + 1)
        raise torch.OutOfMemoryError("debug_oom_steps test hook")
    micro = list(job.train_batches(step, state.micro_batch_size, state.grad_accum, rt.rank, rt.world_size))
    for i, batch in enumerate(micro):
        with no_grad_sync(engine.model, i == len(micro) - 1), autocast_for(engine.precision, engine.device):
            loss, _ = job.objective(engine.forward, batch)
            if step + 1 in guards.debug_nan_steps:
                loss = loss * float("nan")
        engine.scaler.scale(loss / state.grad_accum).backward()
        loss_sum += loss.detach().float().item()
        if job.batch_tokens is not None:
            in_tokens += job.batch_tokens(batch)
    return loss_sum, in_tokens


def _back_off(engine: Engine, state: TrainState, guards: GuardConfig, logger: MetricsLogger,
              error: torch.OutOfMemoryError) -> None:
    """Drop the partial gradients and halve the micro-batch, or stop when that is off or impossible."""
    engine.optimizer.zero_grad(set_to_none=True)
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    step, micro_bs = state.step, state.micro_batch_size
    if not guards.oom_retry or micro_bs == 1:
        raise TrainingStopped(f"out of memory at step {step + 1} with micro_batch_size {micro_bs}: {error}; "
                              "lower train.micro_batch_size or model size, or enable "
                              "train.grad_checkpointing") from None
    state.micro_batch_size, state.grad_accum = micro_bs // 2, state.grad_accum * 2
    logger.event(step + 1, "oom", f"micro_batch_size -> {state.micro_batch_size}, grad_accum -> {state.grad_accum} "
                                  "(same global batch)")


def update(engine: Engine, state: TrainState, loss: float, grad_clip: float, logger: MetricsLogger
           ) -> tuple[float, str | None]:
    """Unscale, clip, and apply the update unless the guard objects; returns (grad norm, skip reason or None).

    Gradients are zeroed either way. An fp16 overflow is not a skip: GradScaler skips that step and lowers its scale.
    """
    opt, scaler = engine.optimizer, engine.scaler
    scaler.unscale_(opt)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(engine.params, grad_clip if grad_clip > 0 else float("inf")))
    reason = engine.guard.check(loss, grad_norm)
    if reason == "nonfinite" and scaler.is_enabled() and math.isfinite(loss):
        reason = None
    if reason is None:
        scaler.step(opt)
        scaler.update()
    else:
        logger.event(state.step + 1, f"skip_{reason}", f"loss {loss:.4g}, grad_norm {grad_norm:.4g}: update skipped")
        if scaler.is_enabled():
            scaler.update()
    opt.zero_grad(set_to_none=True)
    return grad_norm, reason
