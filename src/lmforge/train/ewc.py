"""Elastic weight consolidation (Kirkpatrick et al. 2017): learn a new task while the weights that mattered for
an old one stay near their old values.

Estimator (the guide's): the empirical diagonal Fisher from per-batch gradients, F = (1/N) Σ_b (∂L_b/∂θ)² at
θ* = the weights the run starts from, where L_b is the old task's mean SFT loss over batch b: the first
N = `ewc.fisher_batches` batches (train.micro_batch_size examples each, in the seed's order) of the train split
of `ewc.fisher_data`, with dropout off. A squared batch gradient is not the mean of per-example squares (it
carries about 1/B of their noise term for batches of B), so `lambda` absorbs the batch size.

F and θ* are computed once and saved (out_dir/ewc_fisher.safetensors, or `ewc.fisher_path`): a resumed run
reads them back, so it neither pays for the Fisher again nor measures it at its resumed weights. The penalty
lambda/2 · Σ F (θ − θ*)² covers the trainable parameters only (LoRA: the adapters) and is added to the loss of
every training micro-batch: the engine divides each micro-batch's loss by grad_accum and DDP averages over the
ranks, so the step's gradient gets exactly one lambda·F·(θ − θ*).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ConfigDict, Field

from lmforge.config import Strict
from lmforge.errors import UserError
from lmforge.train.sft_data import SFTDataConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

FISHER_FILE = "ewc_fisher.safetensors"


class EWCConfig(Strict):
    model_config = ConfigDict(**Strict.model_config, validate_by_name=True, validate_by_alias=True,
                              serialize_by_alias=True)

    lambda_: float = Field(alias="lambda", gt=0, description="penalty strength: lambda/2 · Σ F (θ − θ*)²")
    fisher_data: SFTDataConfig = Field(description="the old task's data (same keys as `data`); its train split "
                                                   "gives the Fisher batches")
    fisher_batches: int = Field(32, gt=0, description="batches of train.micro_batch_size examples the Fisher "
                                                      "averages over")
    fisher_path: Path | None = Field(None, description="where F and θ* are read from if present, else written; "
                                                       "default out_dir/ewc_fisher.safetensors")


class PenaltyMetrics:
    """The job's metrics hook (StepMetrics' `take`): `ewc_penalty` at the logged step's weights, before its update.

    Why not StepMetrics.add: that reads every micro-batch's value to the host; this reads one value per train line.
    """

    def __init__(self):
        self.last: torch.Tensor | None = None

    def take(self, mode: str) -> dict[str, float]:
        if mode != "train" or self.last is None:
            return {}
        out, self.last = {"ewc_penalty": float(self.last)}, None
        return out


class EWCPenalty:
    """lambda/2 · Σ F (θ − θ*)² over the named trainable parameters, and the objective that adds it."""

    def __init__(self, params: dict[str, nn.Parameter], fisher: dict[str, torch.Tensor],
                 theta_star: dict[str, torch.Tensor], lam: float):
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.fisher = [fisher[n].to(p.device, p.dtype) for n, p in zip(self.names, self.params)]
        self.theta_star = [theta_star[n].to(p.device, p.dtype) for n, p in zip(self.names, self.params)]
        self.lam = lam
        self.metrics = PenaltyMetrics()

    def __call__(self):
        import torch

        total = torch.zeros((), device=self.params[0].device, dtype=torch.float32)
        for p, f, t in zip(self.params, self.fisher, self.theta_star):
            total = total + (f * (p - t).square()).sum(dtype=torch.float32)
        return 0.5 * self.lam * total

    def wrap(self, objective):
        """The objective plus the penalty while training (grad enabled); evaluation sees the task loss alone."""
        import torch

        def with_penalty(model, batch):
            loss, n = objective(model, batch)
            if not torch.is_grad_enabled():
                return loss, n
            penalty = self()
            self.metrics.last = penalty.detach()
            return loss + penalty, n

        return with_penalty


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's trainable parameters by name (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def fisher_diagonal(model: nn.Module, objective, batches, precision: str) -> dict[str, torch.Tensor]:
    """Mean over `batches` of the squared gradient of the objective's loss, per trainable parameter (dropout off)."""
    import torch

    from lmforge.device import autocast_for

    params = trainable(model)
    device = next(iter(params.values())).device
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training, n_batches = model.training, 0
    model.eval()
    try:
        for batch in batches:
            with autocast_for(precision, device):
                loss, _ = objective(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for (n, _), g in zip(params.items(), grads):
                if g is not None:
                    fisher[n] += g.float().square()
            n_batches += 1
    finally:
        model.train(was_training)
    return {n: f / max(n_batches, 1) for n, f in fisher.items()}


def save_fisher(path: Path, fisher: dict, theta_star: dict, meta: dict) -> None:
    """F and θ* in one safetensors file (`fisher/NAME`, `theta/NAME`), written to a temp file and renamed."""
    from safetensors.torch import save_file

    tensors = {f"fisher/{n}": f.detach().cpu().contiguous() for n, f in fisher.items()}
    tensors.update({f"theta/{n}": t.detach().float().cpu().contiguous() for n, t in theta_star.items()})
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # writers in other runs never share it
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})
    os.replace(tmp, path)


def load_fisher(path: Path, params: dict[str, nn.Parameter]) -> tuple[dict, dict]:
    """(F, θ*) from `path`, checked against the trainable parameters' names and shapes."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    fisher = {k[len("fisher/"):]: v for k, v in tensors.items() if k.startswith("fisher/")}
    theta = {k[len("theta/"):]: v for k, v in tensors.items() if k.startswith("theta/")}
    for name, p in params.items():
        if name not in fisher or name not in theta or fisher[name].shape != p.shape or theta[name].shape != p.shape:
            raise UserError(f"{path} was computed for other parameters (first mismatch: {name}); delete it or set "
                            "ewc.fisher_path to a new file")
    extra = sorted(set(fisher) - set(params))
    if extra:
        raise UserError(f"{path} holds parameters this model does not train (first: {extra[0]}); delete it or set "
                        "ewc.fisher_path to a new file")
    return fisher, theta


def ewc_objective(ewc: EWCConfig, model: nn.Module, objective, tokenizer, seed: int, micro_batch_size: int,
                  out_dir: Path, precision: str, rt):
    """The objective with the EWC penalty, and its metrics hook; F and θ* computed on rank 0 only when not on disk."""
    from lmforge.train.distributed import barrier
    from lmforge.train.sft_data import load_sft_data, train_batches

    params = trainable(model)
    path = ewc.fisher_path or out_dir / FISHER_FILE
    if rt.is_main and not path.is_file():
        t0 = time.perf_counter()
        data = load_sft_data(ewc.fisher_data, tokenizer, seed)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        batches = train_batches(data, seed, ewc.fisher_data.packing, ewc.fisher_data.max_length, pad_id)
        fisher = fisher_diagonal(model, objective, (batches(i, micro_batch_size, 1, 0, 1)[0]
                                                    for i in range(ewc.fisher_batches)), precision)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_fisher(path, fisher, {n: p.detach() for n, p in params.items()},
                    {"estimator": "empirical diagonal Fisher, squared per-batch gradients",
                     "fisher_data": ewc.fisher_data.path, "fisher_batches": ewc.fisher_batches,
                     "micro_batch_size": micro_batch_size})
        print(f"ewc: computed the diagonal Fisher over {ewc.fisher_batches} batches of {ewc.fisher_data.path} in "
              f"{time.perf_counter() - t0:.1f} s -> {path}", flush=True)
    elif rt.is_main:
        print(f"ewc: reusing the Fisher and θ* in {path}", flush=True)
    barrier(rt)
    fisher, theta = load_fisher(path, params)
    penalty = EWCPenalty(params, fisher, theta, ewc.lambda_)
    return penalty.wrap(objective), penalty.metrics
