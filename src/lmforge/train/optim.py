"""AdamW with the usual parameter groups: no weight decay on norms, biases and embeddings."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay 2-D weight matrices only; embeddings (and a head tied to them), norms and biases are exempt."""
    no_decay_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.dim() < 2 or id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                device: torch.device) -> torch.optim.AdamW:
    """Fused AdamW on CUDA and CPU, sharded (DTensor) parameters included; foreach elsewhere (MPS).

    Fused is one kernel for all parameters, and it can skip an update on the device (`found_inf`), which the
    step guard uses so that a step needs no host read.
    """
    groups = param_groups(model, weight_decay)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused, foreach=None if fused else True)
