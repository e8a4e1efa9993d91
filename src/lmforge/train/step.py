"""One optimizer step: forward/backward over its micro-batches (with a CUDA-OOM backoff the ranks agree on),
then the guarded update. The loss, the gradient norm and the guard's verdict stay on the device: the loop
reads the steps' values together (`read_steps`), once per logged step, so a GPU never waits for the host."""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch

from lmforge.device import autocast_for, sum_dtype
from lmforge.train.config import GuardConfig
from lmforge.train.distributed import (Runtime, all_reduce_sum, any_rank, first_collective_micro, no_grad_sync,
                                       sum_on_device)
from lmforge.train.guards import REASONS, TrainingStopped
from lmforge.train.job import Job
from lmforge.train.metrics import MetricsLogger
from lmforge.train.state import Engine, TrainState


# Test hook: when set, guards.debug_oom_steps and guards.debug_nan_steps fire on this rank only (default: every
# rank), to check that one rank's OOM or NaN makes all ranks act together.
DEBUG_RANK_ENV = "LMFORGE_DEBUG_RANK"


def forward_backward(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig,
                     logger: MetricsLogger) -> tuple[torch.Tensor, float]:
    """Accumulate the gradients of step `state.step + 1`; returns its mean loss over all ranks (a 0-d tensor on the
    device, not read) and its token count.

    A CUDA out-of-memory error on any rank makes every rank halve the micro-batch and double accumulation (the
    same global batch, the same windows) and retry: the ranks agree on it by all-reduces of host tensors (gloo),
    so none trains alone and none waits for its device.
    """
    while True:
        loss_sum, in_tokens, oom = _accumulate(job, engine, state, rt, guards)
        step_tokens, ooms = all_reduce_sum([float(in_tokens), float(oom is not None)], rt)
        if ooms == 0:
            break
        _back_off(engine, state, guards, logger, str(oom) if oom is not None else "on another rank")
    if job.tokens_per_step is not None:
        step_tokens = job.tokens_per_step
    return sum_on_device(loss_sum, rt) / (state.grad_accum * rt.world_size), step_tokens


def _accumulate(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig
                ) -> tuple[torch.Tensor, int, torch.OutOfMemoryError | None]:
    """Forward and backward over this rank's micro-batches: (their loss sum, on the device; their tokens; the OOM).

    An OOM is caught, not raised, so that every rank reaches the same collectives: the ranks agree on it just
    before the step's first collective, and the rest of an attempt that ran out of memory is skipped.
    """
    step = state.step
    debug_here = os.environ.get(DEBUG_RANK_ENV, str(rt.rank)) == str(rt.rank)
    loss_sum = torch.zeros((), dtype=sum_dtype(engine.device), device=engine.device)
    in_tokens, oom = 0, None
    if debug_here and step + 1 in guards.debug_oom_steps and step + 1 not in state.oom_hooks_fired:
        state.oom_hooks_fired.add(step + 1)  # strikes before the step's first forward, as a real OOM might
        oom = torch.OutOfMemoryError("debug_oom_steps test hook")
    micro = list(job.train_batches(step, state.micro_batch_size, state.grad_accum, rt.rank, rt.world_size))
    agree_at = None
    if rt.distributed:  # DeepSpeed's engine: every ZeRO-3 forward gathers parameters, as FSDP's do
        agree_at = 0 if engine.ds is not None else first_collective_micro(engine.model, len(micro))
    for i, batch in enumerate(micro):
        if i == agree_at and any_rank(oom is not None, rt):
            break
        if oom is not None:
            continue
        sync = contextlib.nullcontext() if engine.ds is not None else no_grad_sync(engine.model, i == len(micro) - 1)
        try:
            with sync, autocast_for(engine.precision, engine.device):
                loss, _ = job.objective(engine.forward, batch)
                if debug_here and step + 1 in guards.debug_nan_steps:
                    loss = loss * float("nan")
            if engine.ds is not None:
                from lmforge.train.deepspeed_engine import backward
                backward(engine.ds, loss)  # DeepSpeed divides by the accumulation itself
            else:
                engine.scaler.scale(loss / state.grad_accum).backward()
        except torch.OutOfMemoryError as e:
            oom = e
            continue
        loss_sum += loss.detach().to(loss_sum.dtype)
        if job.batch_tokens is not None:
            in_tokens += job.batch_tokens(batch)
    return loss_sum, in_tokens, oom


def _back_off(engine: Engine, state: TrainState, guards: GuardConfig, logger: MetricsLogger, error: str) -> None:
    """Drop the partial gradients and halve the micro-batch, or stop when that is off or impossible."""
    engine.optimizer.zero_grad(set_to_none=True)
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    step, micro_bs = state.step, state.micro_batch_size
    if engine.ds is not None:
        raise TrainingStopped(f"out of memory at step {step + 1} with micro_batch_size {micro_bs} on DeepSpeed's engine, "
                              "which fixes its micro-batch at start: lower train_micro_batch_size_per_gpu, raise the "
                              f"ZeRO stage or offload, and resume: {error}")
    if not guards.oom_retry or micro_bs == 1:
        raise TrainingStopped(f"out of memory at step {step + 1} with micro_batch_size {micro_bs}: {error}; "
                              "lower train.micro_batch_size or model size, or enable "
                              "train.grad_checkpointing")
    state.micro_batch_size, state.grad_accum = micro_bs // 2, state.grad_accum * 2
    logger.event(step + 1, "oom", f"micro_batch_size -> {state.micro_batch_size}, grad_accum -> {state.grad_accum} "
                                  "(same global batch)")


@dataclass
class StepValues:
    """What one step leaves on the device for the loop to read later: its loss, gradient norm and guard verdict."""

    step: int
    loss: torch.Tensor
    grad_norm: torch.Tensor
    code: torch.Tensor  # index into guards.REASONS: 0 applied, else why the update was skipped


def update(engine: Engine, state: TrainState, loss: torch.Tensor, grad_clip: float) -> StepValues:
    """Unscale, clip, and apply the update unless the guard objects; gradients are zeroed either way.

    With a fused AdamW the skip happens on the device: the verdict goes in as the optimizer's `found_inf` (as
    GradScaler hands it), which leaves parameters, moments and step count untouched. fp16's GradScaler and a
    non-fused optimizer decide on the host instead, one read per step; an fp16 overflow with a finite loss is
    not a skip there (GradScaler skips that step and lowers its scale). Ranks decide alike with no collective of
    their own: the loss is the all-reduced one, and the norm is that of the synchronized gradients (DDP) or the
    global one (FSDP), so a NaN on one rank makes every rank skip.
    """
    if engine.ds is not None:
        return _deepspeed_update(engine, state, loss)
    opt, scaler = engine.optimizer, engine.scaler
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(engine.params, grad_clip if grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    code = engine.guard.verdict(loss, grad_norm)
    if engine.skips_on_device:
        opt.found_inf = (code != 0).to(torch.float32).to(engine.params[0].device)
        try:
            opt.step()
        finally:
            del opt.found_inf
    else:
        code = _host_update(engine, loss, code)
    engine.guard.accept(loss, code != 0)
    opt.zero_grad(set_to_none=True)
    return StepValues(state.step + 1, loss, grad_norm, code)


def _deepspeed_update(engine: Engine, state: TrainState, loss: torch.Tensor) -> StepValues:
    """The update on DeepSpeed's engine, which clips and steps in one call and skips a non-finite gradient itself.

    The guard's verdict can use only the loss (DeepSpeed computes the norm inside its step); a skip goes in as the
    fused AdamW's `found_inf`. DeepSpeed reads its global norm on the host, so this path has one read per step.
    """
    from lmforge.train.deepspeed_engine import update as ds_update
    code = engine.guard.verdict(loss, torch.zeros((), device=loss.device))
    norm, applied = ds_update(engine.ds, code if engine.skips_on_device else None)
    if not applied:  # DeepSpeed's own skip: a non-finite gradient
        code = torch.ones_like(code)
    engine.guard.accept(loss, code != 0)
    return StepValues(state.step + 1, loss, torch.tensor(norm, device=loss.device), code)


def _host_update(engine: Engine, loss: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """The update decided on the host (fp16's GradScaler, non-fused optimizers): returns the final verdict."""
    opt, scaler = engine.optimizer, engine.scaler
    reason = REASONS[int(code)]
    if reason == "nonfinite" and scaler.is_enabled() and math.isfinite(float(loss)):
        reason, code = None, torch.zeros_like(code)
    if reason is None:
        scaler.step(opt)
        scaler.update()
    elif scaler.is_enabled():
        scaler.update()
    return code


def read_steps(pending: list[StepValues]) -> list[tuple[int, float, float, str | None]]:
    """(step, loss, grad norm, skip reason) of each pending step, read from the device at once: the loop's one sync."""
    if not pending:
        return []
    values = torch.stack([torch.stack([v.loss, v.grad_norm.to(v.loss), v.code.to(v.loss)]) for v in pending]).tolist()
    return [(v.step, loss, norm, REASONS[int(code)]) for v, (loss, norm, code) in zip(pending, values)]
