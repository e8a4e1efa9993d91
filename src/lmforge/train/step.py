"""One optimizer step: forward/backward over its micro-batches (with a CUDA-OOM backoff the ranks agree on),
then the guarded update; the loss stays on the device until the step's one read."""
from __future__ import annotations

import math
import os

import torch

from lmforge.device import autocast_for
from lmforge.train.config import GuardConfig
from lmforge.train.distributed import Runtime, any_rank, first_collective_micro, no_grad_sync, step_totals
from lmforge.train.guards import TrainingStopped
from lmforge.train.job import Job
from lmforge.train.metrics import MetricsLogger
from lmforge.train.state import Engine, TrainState


# Test hook: when set, guards.debug_oom_steps and guards.debug_nan_steps fire on this rank only (default: every
# rank), to check that one rank's OOM or NaN makes all ranks act together.
DEBUG_RANK_ENV = "LMFORGE_DEBUG_RANK"


def forward_backward(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig,
                     logger: MetricsLogger) -> tuple[float, float]:
    """Accumulate the gradients of step `state.step + 1`; returns its loss and token count over all ranks.

    A CUDA out-of-memory error on any rank makes every rank halve the micro-batch and double accumulation (the
    same global batch, the same windows) and retry: the ranks agree on it by all-reduces, so none trains alone.
    """
    while True:
        loss_sum, in_tokens, oom = _accumulate(job, engine, state, rt, guards)
        # One collective and one host read per step: the loss, the tokens, and whether any rank ran out of memory.
        loss_sum, step_tokens, ooms = step_totals(loss_sum, [float(in_tokens), float(oom is not None)], rt)
        if ooms == 0:
            break
        _back_off(engine, state, guards, logger, str(oom) if oom is not None else "on another rank")
    if job.tokens_per_step is not None:
        step_tokens = job.tokens_per_step
    return loss_sum / (state.grad_accum * rt.world_size), step_tokens


def _accumulate(job: Job, engine: Engine, state: TrainState, rt: Runtime, guards: GuardConfig
                ) -> tuple[torch.Tensor, int, torch.OutOfMemoryError | None]:
    """Forward and backward over this rank's micro-batches: (their loss sum, on the device; their tokens; the OOM).

    An OOM is caught, not raised, so that every rank reaches the same collectives: the ranks agree on it just
    before the step's first collective, and the rest of an attempt that ran out of memory is skipped.
    """
    step = state.step
    debug_here = os.environ.get(DEBUG_RANK_ENV, str(rt.rank)) == str(rt.rank)
    loss_sum = torch.zeros((), device=engine.device)
    in_tokens, oom = 0, None
    if debug_here and step + 1 in guards.debug_oom_steps and step + 1 not in state.oom_hooks_fired:
        state.oom_hooks_fired.add(step + 1)  # strikes before the step's first forward, as a real OOM might
        oom = torch.OutOfMemoryError("debug_oom_steps test hook")
    micro = list(job.train_batches(step, state.micro_batch_size, state.grad_accum, rt.rank, rt.world_size))
    agree_at = first_collective_micro(engine.model, len(micro)) if rt.distributed else None
    for i, batch in enumerate(micro):
        if i == agree_at and any_rank(oom is not None, rt):
            break
        if oom is not None:
            continue
        try:
            with no_grad_sync(engine.model, i == len(micro) - 1), autocast_for(engine.precision, engine.device):
                loss, _ = job.objective(engine.forward, batch)
                if debug_here and step + 1 in guards.debug_nan_steps:
                    loss = loss * float("nan")
            engine.scaler.scale(loss / state.grad_accum).backward()
        except torch.OutOfMemoryError as e:
            oom = e
            continue
        loss_sum += loss.detach().float()
        if job.batch_tokens is not None:
            in_tokens += job.batch_tokens(batch)
    return loss_sum, in_tokens, oom


def _back_off(engine: Engine, state: TrainState, guards: GuardConfig, logger: MetricsLogger, error: str) -> None:
    """Drop the partial gradients and halve the micro-batch, or stop when that is off or impossible."""
    engine.optimizer.zero_grad(set_to_none=True)
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    step, micro_bs = state.step, state.micro_batch_size
    if not guards.oom_retry or micro_bs == 1:
        raise TrainingStopped(f"out of memory at step {step + 1} with micro_batch_size {micro_bs}: {error}; "
                              "lower train.micro_batch_size or model size, or enable "
                              "train.grad_checkpointing")
    state.micro_batch_size, state.grad_accum = micro_bs // 2, state.grad_accum * 2
    logger.event(step + 1, "oom", f"micro_batch_size -> {state.micro_batch_size}, grad_accum -> {state.grad_accum} "
                                  "(same global batch)")


def update(engine: Engine, state: TrainState, loss: float, grad_clip: float, logger: MetricsLogger
           ) -> tuple[float, str | None]:
    """Unscale, clip, and apply the update unless the guard objects; returns (grad norm, skip reason or None).

    Gradients are zeroed either way. An fp16 overflow is not a skip: GradScaler skips that step and lowers its scale.
    Ranks decide alike with no collective of their own: the loss is the all-reduced one, and the norm is that of
    the synchronized gradients (DDP) or the global one (FSDP), so a NaN on one rank makes every rank skip.
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
