"""Objectives: turn a micro-batch into a scalar loss. Later stages add masked SFT, reward, DPO, PPO."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.build import logits_of


def causal_lm(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy, mean over all target tokens."""
    x, y = batch
    device = next(model.parameters()).device
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    logits = logits_of(model, x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))  # autocast runs it in fp32
    return loss, y.numel()
