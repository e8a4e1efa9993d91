"""Validation loss and perplexity over the job's fixed eval batches, summed over ranks."""
from __future__ import annotations

import math

import torch

from lmforge.train.distributed import Runtime, all_reduce_sum, eval_shard
from lmforge.train.job import Job
from lmforge.train.state import Engine
from lmforge.device import autocast_for, sum_dtype


@torch.no_grad()
def evaluate(job: Job, engine: Engine, rt: Runtime, parallel: str, micro_batch_size: int) -> tuple[float, float] | None:
    """(val loss, val perplexity) token-weighted over all ranks, or None when the job has no eval batches."""
    if job.eval_batches is None:
        return None
    engine.model.eval()
    total, count = torch.zeros((), dtype=sum_dtype(engine.device), device=engine.device), 0
    for batch, counted in eval_shard(job.eval_batches, micro_batch_size, rt, parallel):
        with autocast_for(engine.precision, engine.device):
            loss, n = job.objective(engine.forward, batch)
        if counted:  # FSDP pads ranks to the same number of forwards; padding is not counted
            total += loss.detach().to(total.dtype) * n
            count += n
    engine.model.train()
    total, count = all_reduce_sum([float(total), float(count)], rt)  # the evaluation's one read
    val_loss = total / max(count, 1)
    return val_loss, math.exp(min(val_loss, 50.0))
