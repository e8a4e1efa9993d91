"""The alignment objectives' maths, as plain tensor functions: pairwise reward, DPO, GRPO, PPO.

Each follows TRL's definition (trl 1.16 `RewardTrainer`, `DPOTrainer`, `GRPOTrainer`; PPO as in
`trl.experimental.ppo` of trl 0.29) so that a model trained here means what it means there;
tests/test_align_trl.py checks the values and gradients against TRL itself. Kept free of models and
batching so that each can be read, and tested, alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmforge.align.config import DPO_LOSSES, GRPO_LOSSES


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is true (over `dim`, or all of it)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values - mean) / std over the masked entries (unbiased variance); `shift_mean=False` adds the mean back."""
    mean = masked_mean(values, mask)
    n = mask.sum()
    var = masked_mean((values - mean) ** 2, mask) * n / (n - 1)
    out = (values - mean) * torch.rsqrt(var + 1e-8)
    return out if shift_mean else out + mean


# ---- reward model ----------------------------------------------------------------------------------

def reward_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                center_rewards: float | None = None) -> torch.Tensor:
    """Bradley-Terry: mean of -log sigmoid(r_chosen - r_rejected - margin), plus coef * mean((r_c + r_r)^2)."""
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards:
        loss = loss + center_rewards * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ---- DPO -------------------------------------------------------------------------------------------

def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str, label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None, rejected_tokens: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards) from summed completion log-probs of policy and reference.

    sigmoid is DPO (with `label_smoothing`, conservative DPO; TRL's sigmoid is the 0 case), robust is
    rDPO, hinge is SLiC, ipo is IPO on per-token averaged log-ratios (its token counts are needed).
    The rewards are beta * (policy - reference) log-ratios, detached, as TRL logs them.
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the completions' token counts")
        avg = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ---- GRPO ------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, zero-std flags): each reward less its group's mean, over the group's (or batch's) std + 1e-4.

    `rewards` holds consecutive groups of `group_size` completions of one prompt; scale is group, batch
    or none (Dr. GRPO: no division, which keeps easy and hard prompts on one scale).
    """
    groups = rewards.view(-1, group_size)
    mean = groups.mean(1).repeat_interleave(group_size)
    if scale == "batch":
        std = (rewards.std() if rewards.numel() > 1 else torch.zeros(())).expand_as(rewards)
    else:
        std = groups.std(1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean
    if scale != "none":
        advantages = advantages / (std + 1e-4)
    return advantages, torch.isclose(std, torch.zeros_like(std))


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              loss_type: str, epsilon: float, epsilon_high: float, beta: float = 0.0,
              ref_logps: torch.Tensor | None = None, max_completion_length: int | None = None,
              num_items: float | None = None, kl_bias_correction: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate over (B, T) completion tokens; returns (loss, stats).

    grpo averages each completion's tokens then the completions; dr_grpo divides the token sum by
    B * max_completion_length (no length bias); dapo divides it by `num_items`, the completion tokens
    of the whole step (pass the step's count over accumulation: the engine divides by it after). The
    KL term (k3 to the reference, times the importance ratio unless `kl_bias_correction` is off) is added
    per token only when beta > 0, as in TRL.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        if kl_bias_correction:  # the KL of tokens sampled from the old policy, importance-weighted (TRL's default)
            kl = kl * ratio
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("the dr_grpo loss needs max_completion_length")
        loss = (per_token * mask).sum() / (per_token.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token * mask).sum() / (mask.sum() if num_items is None else max(num_items, 1.0))
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {', '.join(GRPO_LOSSES)}")
    with torch.no_grad():
        low = (ratio < 1 - epsilon) & (adv < 0)
        high = (ratio > 1 + epsilon_high) & (adv > 0)
        stats["clip_ratio/low_mean"] = masked_mean(low.to(mask.dtype), mask)
        stats["clip_ratio/high_mean"] = masked_mean(high.to(mask.dtype), mask)
        stats["clip_ratio/region_mean"] = masked_mean((low | high).to(mask.dtype), mask)
    return loss, stats


# ---- PPO -------------------------------------------------------------------------------------------

def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate of the sampled tokens: k1 = log p - log q, k3 = e^-k1 - 1 + k1."""
    logr = ref_logps - logps
    if estimator == "k1":
        return -logr
    if estimator == "k3":
        return (logr.exp() - 1) - logr
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected k1 or k3")


def ppo_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, last: torch.Tensor, *,
                kl_coef: float, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token rewards, per-token KL) of (B, T) responses: -kl_coef * KL everywhere, plus the score once.

    `last[b]` is the index of response b's last token. As TRL places it, the score goes one position past
    that token when the response has room there (its value is learned too), else on the last token.
    """
    kl = kl_penalty(logps, ref_logps, estimator)
    rewards = -kl_coef * kl
    end = torch.where(last + 1 < rewards.size(1), last + 1, last)
    rewards[torch.arange(rewards.size(0), device=rewards.device), end] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by generalised advantage estimation over (B, T), the value after T taken as 0."""
    last_gae = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    T = rewards.size(1)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_gae = delta + gamma * lam * last_gae
        reversed_adv.append(last_gae)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def ppo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
             values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_mask: torch.Tensor, *,
             cliprange: float, cliprange_value: float, vf_coef: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss plus vf_coef x clipped value loss (TRL's PPO), and their stats."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    v_clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    vf1, vf2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), value_mask)
    with torch.no_grad():
        stats = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(),
                 "clipfrac": masked_mean((pg2 > pg1).to(logps.dtype), mask),
                 "value_clipfrac": masked_mean((vf2 > vf1).to(logps.dtype), value_mask),
                 "approx_kl": 0.5 * masked_mean(log_ratio ** 2, mask)}
    return pg_loss + vf_coef * vf_loss, stats
