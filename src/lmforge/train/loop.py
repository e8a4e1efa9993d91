"""The training engine: one loop for pretraining, fine-tuning and alignment.

A stage hands over a `Job` (the model, an objective that turns a micro-batch into a loss, a
function that yields a step's micro-batches, and how to export weights); everything else —
precision, accumulation, clipping, schedule, checkpoint/resume, guards, metrics, distributed —
lives in train/, once. The components each own one concern (checkpoint.py: save, resume, roll
back; step.py: forward/backward and the update; evaluate.py: validation loss) and share the run's
objects and counters through `Engine` and `TrainState` (state.py). Read `train()` top to bottom.
"""
from __future__ import annotations

import time

from lmforge.device import resolve_precision
from lmforge.runs import checkpoints_dir, latest_checkpoint, step_dir_name
from lmforge.train.checkpoint import Checkpointer, resume_path
from lmforge.train.distributed import Runtime
from lmforge.train.evaluate import evaluate
from lmforge.train.guards import TrainingStopped
from lmforge.train.job import Job, RunSpec
from lmforge.train.metrics import MetricsLogger, device_peak_flops, memory_gb
from lmforge.train.schedule import lr_at
from lmforge.train.state import Engine, TrainState, build_engine
from lmforge.train.step import StepValues, forward_backward, read_steps, update


def train(job: Job, spec: RunSpec, rt: Runtime) -> dict:
    """Run (or resume) training to `train.max_steps`; returns a summary dict."""
    tc, guards = spec.train, spec.guards
    engine = build_engine(job.model, job.blocks, tc, guards, rt, resolve_precision(tc.precision, rt.device),
                          spec.deepspeed)
    ckpt_root = checkpoints_dir(spec.out_dir)
    resume_from = resume_path(spec.resume, ckpt_root)
    logger = MetricsLogger(spec.out_dir, rt.is_main, tc.max_steps, 0, spec.log.tensorboard, spec.log.wandb,
                           spec.log.wandb_project, spec.config_dump, spec.log.progress)
    checkpointer = Checkpointer(ckpt_root, job, engine, rt, logger, tc.keep_last, spec.config_dump,
                                async_save=tc.async_checkpoint)
    state = TrainState(micro_batch_size=tc.micro_batch_size, grad_accum=tc.grad_accum)
    if resume_from is not None:
        checkpointer.resume(resume_from, state)

    pending: list[StepValues] = []  # steps taken whose loss, norm and verdict are still on the device
    try:
        engine.model.train()
        state.start_clock()
        t_log, tokens_since_log = time.perf_counter(), 0
        peak = device_peak_flops(engine.device)
        decay_steps = tc.decay_steps or tc.max_steps
        first_val = last_val = loss = None
        if state.step == 0 and tc.eval_every:
            first_val = evaluate(job, engine, rt, tc.parallel, state.micro_batch_size)
            if first_val:
                logger.eval(0, *first_val, state.elapsed_before, _extra(job, "eval"))

        while state.step < tc.max_steps:
            lr = lr_at(state.step, tc.lr, tc.min_lr, tc.warmup_steps, decay_steps, tc.schedule) * state.lr_scale
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            step_loss, tokens = forward_backward(job, engine, state, rt, guards, logger)
            pending.append(update(engine, state, step_loss, tc.grad_clip))
            state.step += 1
            state.tokens += tokens
            tokens_since_log += tokens
            logger.advance()
            log_now = state.step % tc.log_every == 0 or state.step == tc.max_steps
            eval_now = bool(tc.eval_every) and state.step % tc.eval_every == 0 and state.step != tc.max_steps
            ckpt_now = bool(tc.ckpt_every) and state.step % tc.ckpt_every == 0 and state.step != tc.max_steps
            if not (log_now or eval_now or ckpt_now):
                continue
            # The host reads the steps since the last read at once, and the guard catches up with them: a run of
            # bad steps rolls back or stops here, before anything is logged, evaluated or saved from a bad state.
            (step, loss, grad_norm, _), action = _settle(pending, engine, logger)
            pending.clear()
            if action == "rollback":
                if checkpointer.roll_back(state, guards.rollback_lr_factor) is None:
                    raise TrainingStopped(f"{guards.max_bad_steps} bad steps in a row at step {step} and no "
                                          "checkpoint to roll back to; lower train.lr or check the data")
                t_log, tokens_since_log = time.perf_counter(), 0
                continue
            if action == "stop":
                raise TrainingStopped(f"{guards.max_bad_steps} bad steps in a row at step {step}; lower train.lr, "
                                      "raise train.warmup_steps, or check the data")
            if log_now:
                now = time.perf_counter()
                tokens_per_sec = tokens_since_log / max(now - t_log, 1e-9)
                record = _train_record(state, loss, lr, grad_norm, tokens_per_sec, now, engine)
                record.update(_extra(job, "train"))
                if peak and job.flops_per_token:
                    record["mfu"] = tokens_per_sec * job.flops_per_token / (peak * rt.world_size)
                logger.train(record)
                t_log, tokens_since_log = now, 0
            if eval_now:
                last_val = _evaluate_and_log(job, engine, rt, tc.parallel, state, logger) or last_val
            if ckpt_now:
                checkpointer.save(state)

        last_val = _evaluate_and_log(job, engine, rt, tc.parallel, state, logger) or last_val
        checkpointer.finish_pending()
        final = latest_checkpoint(ckpt_root)
        if final is None or final.name != step_dir_name(state.step):
            final = checkpointer.save(state, final=True)
    except TrainingStopped as e:
        if pending:  # an OOM with nothing left to halve: the steps before it still get their skip events
            _settle(pending, engine, logger)
        checkpointer.finish_pending()  # the ranks agreed to stop, so they all get here: keep the last checkpoint
        logger.event(state.step + 1, "stop", str(e))
        raise
    finally:
        logger.close()
    return {"steps": state.step, "final_checkpoint": str(final) if final else None,
            "elapsed_s": time.perf_counter() - state.started, "first_val": first_val, "last_val": last_val,
            "precision": engine.precision, "train_loss": loss}


def _settle(pending: list[StepValues], engine: Engine, logger: MetricsLogger
            ) -> tuple[tuple[int, float, float, str | None], str | None]:
    """Read the pending steps, log their skips and let the guard count them, in step order.

    Returns the last step read (or the one where the guard acted) and the guard's action ("rollback", "stop" or
    None); the steps after an action are not counted, since a rollback or a stop undoes them.
    """
    steps = read_steps(pending)
    for values in steps:
        step, loss, grad_norm, reason = values
        if reason is not None:
            logger.event(step, f"skip_{reason}", f"loss {loss:.4g}, grad_norm {grad_norm:.4g}: update skipped")
        action = engine.guard.record(loss, skipped=reason is not None)
        if action is not None:
            return values, action
    return steps[-1], None


def _train_record(state: TrainState, loss: float, lr: float, grad_norm: float, tokens_per_sec: float, now: float,
                  engine: Engine) -> dict:
    """A metrics.jsonl train line for the step just taken (mfu, when known, is added after)."""
    return {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": tokens_per_sec,
            "tokens": int(state.tokens), "elapsed_s": state.elapsed(now), "mem_gb": memory_gb(engine.device),
            "micro_batch_size": state.micro_batch_size, "grad_accum": state.grad_accum}


def _evaluate_and_log(job: Job, engine: Engine, rt: Runtime, parallel: str, state: TrainState,
                      logger: MetricsLogger) -> tuple[float, float] | None:
    """Evaluate at `state.step` and write the eval line; None when the job has no eval batches."""
    result = evaluate(job, engine, rt, parallel, state.micro_batch_size)
    if result:
        logger.eval(state.step, *result, state.elapsed(), _extra(job, "eval"))
    return result


def _extra(job: Job, mode: str) -> dict:
    """The objective's own numbers since they were last written (none for jobs that keep none)."""
    return job.metrics.take(mode) if job.metrics is not None else {}
