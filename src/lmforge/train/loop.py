"""The training engine: one loop for pretraining, fine-tuning and alignment.

A stage hands over a `Job` (the model, an objective that turns a micro-batch into a loss, a
function that yields a step's micro-batches, and how to export weights); everything else —
precision, accumulation, clipping, schedule, checkpoint/resume, guards, metrics, distributed —
lives here, once. Read `train()` top to bottom.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch

from lmforge.device import resolve_precision
from lmforge.train import checkpoint as ckpt
from lmforge.train.distributed import Runtime, all_reduce_sum, barrier, eval_shard, no_grad_sync, wrap_model
from lmforge.train.guards import StepGuard, TrainingStopped
from lmforge.train.job import Job, RunSpec
from lmforge.train.metrics import MetricsLogger, device_peak_flops, memory_gb
from lmforge.train.optim import build_adamw
from lmforge.train.schedule import lr_at


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(job: Job, spec: RunSpec, rt: Runtime) -> dict:
    """Run (or resume) training to `train.max_steps`; returns a summary dict."""
    tc, out = spec.train, spec.out_dir
    device = rt.device
    precision = resolve_precision(tc.precision, device)
    ckpt_root = out / "checkpoints"

    model = job.model.to(device)
    if tc.grad_checkpointing:
        if hasattr(model, "gradient_checkpointing_enable"):  # transformers (and PEFT-wrapped) models
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing = True
    mp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if tc.parallel == "fsdp" else None
    model = wrap_model(model, rt, tc.parallel, job.blocks, mp_dtype)
    opt = build_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    fwd_model = torch.compile(model) if tc.compile else model
    guard = StepGuard(spec.guards)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- resume --------------------------------------------------------------------------
    step, lr_scale, micro_bs, accum, elapsed_before = 0, 1.0, tc.micro_batch_size, tc.grad_accum, 0.0
    tokens_total = 0.0
    resume_from = None
    if spec.resume == "auto":
        resume_from = ckpt.latest_checkpoint(ckpt_root)
    elif spec.resume != "never":
        resume_from = Path(spec.resume)

    def restore(path: Path) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)
        state = ckpt.load_trainer_state(path)
        opts = StateDictOptions(full_state_dict=True, strict=not job.trainable_only)
        set_model_state_dict(model, job.load_model(path), options=opts)
        set_optimizer_state_dict(model, opt, state["optimizer"], options=opts)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        guard.load_state_dict(state["guard"])
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
        return state

    logger = MetricsLogger(out, rt.is_main, tc.max_steps, 0, spec.log.tensorboard, spec.log.wandb,
                           spec.log.wandb_project, spec.config_dump, spec.log.progress)
    if resume_from is not None:
        state = restore(resume_from)
        step, lr_scale = int(state["step"]), float(state["lr_scale"])
        micro_bs, accum = int(state["micro_batch_size"]), int(state["grad_accum"])
        elapsed_before = float(state.get("elapsed_s", 0.0))
        tokens_total = float(state.get("tokens", 0.0))
        if state.get("world_size", rt.world_size) != rt.world_size:
            logger.event(step, "world_size_changed",
                         f"checkpoint written by {state['world_size']} processes, resumed on {rt.world_size}")
        logger.event(step, "resumed", f"from {resume_from}")
        if logger.bar:
            logger.bar.n = step

    def save(at_step: int) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=job.trainable_only)
        msd = get_model_state_dict(model, options=opts)
        osd = get_optimizer_state_dict(model, opt, options=opts)
        path = None
        if rt.is_main:
            state = {
                "step": at_step, "optimizer": osd, "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "guard": guard.state_dict(), "lr_scale": lr_scale, "micro_batch_size": micro_bs,
                "grad_accum": accum, "data_position": at_step, "world_size": rt.world_size,
                "elapsed_s": elapsed_before + (time.perf_counter() - t_start), "tokens": tokens_total,
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "config": spec.config_dump,
            }
            path = ckpt.save_checkpoint(ckpt_root, at_step, lambda d: job.save_model(d, msd), state, tc.keep_last)
            logger.event(at_step, "checkpoint", str(path))
        barrier(rt)
        return path

    @torch.no_grad()
    def evaluate() -> tuple[float, float] | None:
        if job.eval_batches is None:
            return None
        model.eval()
        total, count = 0.0, 0
        for batch, counted in eval_shard(job.eval_batches, micro_bs, rt, tc.parallel):
            with autocast_for(precision, device):
                loss, n = job.objective(fwd_model, batch)
            if counted:  # FSDP pads ranks to the same number of forwards; padding is not counted
                total += loss.item() * n
                count += n
        model.train()
        total, count = all_reduce_sum([total, float(count)], rt)
        val_loss = total / max(count, 1)
        return val_loss, math.exp(min(val_loss, 50.0))

    # ---- the loop ------------------------------------------------------------------------
    try:
        model.train()
        t_start = time.perf_counter()
        t_log, tokens_since_log = time.perf_counter(), 0
        peak = device_peak_flops(device)
        decay_steps = tc.decay_steps or tc.max_steps
        first_val = last_val = step_loss = None
        oom_hook_fired: set[int] = set()
        if step == 0 and tc.eval_every:
            result = evaluate()
            if result:
                first_val = result
                logger.eval(0, *result, elapsed_before)

        while step < tc.max_steps:
            lr = lr_at(step, tc.lr, tc.min_lr, tc.warmup_steps, decay_steps, tc.schedule) * lr_scale
            for group in opt.param_groups:
                group["lr"] = lr

            # Forward/backward over the micro-batches; a CUDA OOM halves the micro-batch and retries.
            while True:
                try:
                    loss_sum, in_tokens = 0.0, 0
                    if step + 1 in spec.guards.debug_oom_steps and step + 1 not in oom_hook_fired:
                        oom_hook_fired.add(step + 1)
                        raise torch.OutOfMemoryError("debug_oom_steps test hook")
                    micro = list(job.train_batches(step, micro_bs, accum, rt.rank, rt.world_size))
                    for i, batch in enumerate(micro):
                        with no_grad_sync(model, i == len(micro) - 1), autocast_for(precision, device):
                            loss, _ = job.objective(fwd_model, batch)
                            if step + 1 in spec.guards.debug_nan_steps:
                                loss = loss * float("nan")
                        scaler.scale(loss / accum).backward()
                        loss_sum += loss.detach().float().item()
                        if job.batch_tokens is not None:
                            in_tokens += job.batch_tokens(batch)
                    break
                except torch.OutOfMemoryError as e:
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    if not spec.guards.oom_retry or micro_bs == 1:
                        raise TrainingStopped(f"out of memory at step {step + 1} with micro_batch_size {micro_bs}: {e}; "
                                              "lower train.micro_batch_size or model size, or enable "
                                              "train.grad_checkpointing") from None
                    micro_bs, accum = micro_bs // 2, accum * 2
                    logger.event(step + 1, "oom", f"micro_batch_size -> {micro_bs}, grad_accum -> {accum} (same global batch)")

            loss_sum, step_tokens = all_reduce_sum([loss_sum, float(in_tokens)], rt)
            if job.tokens_per_step is not None:
                step_tokens = job.tokens_per_step
            step_loss = loss_sum / (accum * rt.world_size)
            scaler.unscale_(opt)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, tc.grad_clip if tc.grad_clip > 0 else float("inf")))
            reason = guard.check(step_loss, grad_norm)
            if reason == "nonfinite" and scaler.is_enabled() and math.isfinite(step_loss):
                reason = None  # fp16 overflow: GradScaler skips the step and lowers its scale itself
            if reason is None:
                scaler.step(opt)
                scaler.update()
            else:
                logger.event(step + 1, f"skip_{reason}", f"loss {step_loss:.4g}, grad_norm {grad_norm:.4g}: update skipped")
                if scaler.is_enabled():
                    scaler.update()
            opt.zero_grad(set_to_none=True)
            action = guard.record(step_loss, skipped=reason is not None)
            if action == "rollback":
                last = ckpt.latest_checkpoint(ckpt_root)
                if last is None:
                    raise TrainingStopped(f"{spec.guards.max_bad_steps} bad steps in a row at step {step + 1} and no "
                                          "checkpoint to roll back to; lower train.lr or check the data")
                rollbacks = guard.rollbacks
                state = restore(last)
                guard.rollbacks = rollbacks
                lr_scale *= spec.guards.rollback_lr_factor
                step = int(state["step"])
                logger.event(step, "rollback", f"to {last.name}, learning rate x{lr_scale:g}")
                if logger.bar:
                    logger.bar.n = step
                continue
            if action == "stop":
                raise TrainingStopped(f"{spec.guards.max_bad_steps} bad steps in a row at step {step + 1} (last: {reason}); "
                                      "lower train.lr, raise train.warmup_steps, or check the data")

            step += 1
            tokens_since_log += step_tokens
            tokens_total += step_tokens
            logger.advance()
            if step % tc.log_every == 0 or step == tc.max_steps:
                now = time.perf_counter()
                tps = tokens_since_log / max(now - t_log, 1e-9)
                record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tps,
                          "tokens": int(tokens_total),
                          "elapsed_s": elapsed_before + now - t_start, "mem_gb": memory_gb(device),
                          "micro_batch_size": micro_bs, "grad_accum": accum}
                if peak and job.flops_per_token:
                    record["mfu"] = tps * job.flops_per_token / (peak * rt.world_size)
                logger.train(record)
                t_log, tokens_since_log = now, 0
            if tc.eval_every and step % tc.eval_every == 0 and step != tc.max_steps:
                result = evaluate()
                if result:
                    last_val = result
                    logger.eval(step, *result, elapsed_before + time.perf_counter() - t_start)
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step != tc.max_steps:
                save(step)

        result = evaluate()
        if result:
            last_val = result
            logger.eval(step, *result, elapsed_before + time.perf_counter() - t_start)
        final = ckpt.latest_checkpoint(ckpt_root)
        if final is None or final.name != ckpt.step_dir_name(step):
            final = save(step)
    except TrainingStopped as e:
        logger.event(step + 1, "stop", str(e))
        raise
    finally:
        logger.close()
    elapsed = time.perf_counter() - t_start
    return {"steps": step, "final_checkpoint": str(final) if final else None, "elapsed_s": elapsed,
            "first_val": first_val, "last_val": last_val, "precision": precision, "train_loss": step_loss}
