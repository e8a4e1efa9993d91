"""Online RL on the engine: rollouts from the policy's current weights, then GRPO or PPO updates on them.

A rollout batch is generated (seeded per prompt, through infer's continuous-batching engine) at the
first optimizer step of each cycle and used for the cycle's steps: GRPO's `num_iterations`, PPO's
`num_ppo_epochs x num_mini_batches`. Prompts, seeds and minibatch orders are pure functions of
(seed, cycle), and checkpoints fall on cycle boundaries, so a resumed run regenerates exactly the
rollouts an uninterrupted one made.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from lmforge.align.data import Prompt
from lmforge.align.losses import gae, group_advantages, grpo_loss, masked_mean, masked_whiten, ppo_loss, ppo_rewards
from lmforge.align.models import pack, policy_logps, reward_scores, to_padded, unwrap
from lmforge.align.pairs import EpochOrder, micro_slices
from lmforge.align.rewards import RewardFn, score
from lmforge.infer.engine import SamplingParams
from lmforge.infer.live import LiveGenerator
from lmforge.train.metrics import StepMetrics

PPO_KEY = 0x5050  # keeps PPO's minibatch permutations apart from the prompt order's rng stream


def request_seed(seed: int, cycle: int, j: int) -> int:
    """The sampling seed of prompt j of a cycle's rollout batch."""
    return int(np.random.default_rng([seed, cycle, j]).integers(2**62))


def columns(records: list[dict], repeat: int) -> dict[str, list]:
    """The prompt records' fields, one entry per completion, for reward functions."""
    keys = sorted({k for r in records for k in r} - {"prompt", "messages"})
    return {k: [r.get(k) for r in records for _ in range(repeat)] for k in keys}


@torch.no_grad()
def _per_sequence(model: nn.Module, seqs: list[tuple], micro_bs: int, temperature: float, values: bool = False,
                  reference: nn.Module | None | bool = None, rows: bool = False
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-sequence answer log-probs (and values) in chunks of micro_bs; `reference` True: the adapter switched off,
    a module: that frozen model."""
    lps, vals = [], []
    for lo in range(0, len(seqs), micro_bs):
        chunk = seqs[lo:lo + micro_bs]
        batch = pack(chunk, rows)
        if reference is True:
            with unwrap(model).reference():
                lp, _, v = policy_logps(model, batch, temperature)
        else:
            lp, _, v = policy_logps(reference if isinstance(reference, nn.Module) else model, batch, temperature,
                                    values=values)
        lens = batch["answer_tokens"].tolist()
        lps += list(lp.float().cpu().split(lens))
        if v is not None:
            vals += list(v.cpu().split([a + 1 for a in lens]))
    return lps, vals


@dataclass
class Rollout:
    """One cycle's generated batch and everything its updates need, per completion."""
    cycle: int
    seqs: list[tuple[list[int], list[int]]]
    tensors: dict[str, list[torch.Tensor] | torch.Tensor]
    n_tokens: int  # completion tokens of the whole batch


class Rollouts:
    """Generates and scores a cycle's batch; shared by GRPO and PPO."""

    def __init__(self, policy: nn.Module, tokenizer, eos_ids: list[int], prompts: list[Prompt], seed: int,
                 sampling, generator: LiveGenerator, metrics: StepMetrics, rows: bool = False):
        self.policy, self.tok, self.eos_ids = policy, tokenizer, set(eos_ids)
        self.prompts, self.seed, self.s = prompts, seed, sampling
        self.order = EpochOrder(len(prompts), seed)
        self.gen, self.metrics = generator, metrics
        self.rows = rows  # batch layout: one packed row, or one padded row per sequence (data.packing=false)

    def sample(self, cycle: int, n_prompts: int, n: int) -> tuple[list[Prompt], list[list[int]], list[str]]:
        """The cycle's prompts and `n` completions of each (token ids, EOS kept; text), with timing metrics."""
        prompts = [self.prompts[self.order[cycle * n_prompts + j]] for j in range(n_prompts)]
        params = [SamplingParams(max_tokens=self.s.max_completion_length, temperature=self.s.temperature,
                                 top_p=self.s.top_p, top_k=self.s.top_k, n=n, seed=request_seed(self.seed, cycle, j))
                  for j in range(n_prompts)]
        t0 = time.perf_counter()
        done = self.gen.generate([p.ids for p in prompts], params)
        seconds = time.perf_counter() - t0
        ids = [c.token_ids or [min(self.eos_ids)] for c in done]
        texts = [self.tok.decode(t, skip_special_tokens=True) for t in ids]
        generated = sum(map(len, ids))
        lengths = [len(t) for t in ids]
        self.metrics.add("train", {
            "completions/mean_length": float(np.mean(lengths)),
            "completions/clipped_ratio": float(np.mean([c.finish_reason == "length" for c in done])),
            "gen_tokens": float(generated), "gen_s": seconds, "gen_tokens_per_s": generated / max(seconds, 1e-9)})
        return prompts, ids, texts

    def ends_with_eos(self, ids: list[int]) -> bool:
        return bool(ids) and ids[-1] in self.eos_ids


# ---- GRPO ------------------------------------------------------------------------------------------

class GRPO:
    """GRPO's `train_batches` (rollouts + group advantages) and objective."""

    def __init__(self, rollouts: Rollouts, cfg, reward_fns: dict[str, RewardFn], micro_bs: int, metrics: StepMetrics):
        self.r, self.cfg, self.fns, self.micro_bs, self.metrics = rollouts, cfg, reward_fns, micro_bs, metrics
        weights = cfg.reward_weights or [1.0] * len(reward_fns)
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.buffer: Rollout | None = None

    def rollout(self, cycle: int, global_batch: int) -> Rollout:
        G = self.cfg.num_generations
        policy = self.r.policy
        was_training = policy.training
        policy.eval()
        prompts, ids, texts = self.r.sample(cycle, global_batch // G, G)
        per_func = score(self.fns, [p.text for p in prompts for _ in range(G)], texts,
                         columns([p.record for p in prompts], G))
        table = torch.tensor([per_func[name] for name in self.fns], dtype=torch.float32).T  # (n, F)
        rewards = (table * self.weights).nansum(dim=1)
        advantages, zero_std = group_advantages(rewards, G, self.cfg.scale_rewards)
        seqs = [(prompts[i // G].ids, t) for i, t in enumerate(ids)]
        tensors: dict = {"advantages": advantages}
        if self.cfg.num_iterations > 1:
            tensors["old_logps"] = _per_sequence(policy, seqs, self.micro_bs, self.cfg.temperature,
                                                 rows=self.r.rows)[0]
        if self.cfg.beta > 0:
            tensors["ref_logps"] = _per_sequence(policy, seqs, self.micro_bs, self.cfg.temperature, reference=True,
                                                 rows=self.r.rows)[0]
        policy.train(was_training)
        stats = {"reward": rewards.mean(), "reward_std": rewards.view(-1, G).std(1).mean(),
                 "frac_reward_zero_std": zero_std.float().mean()}
        for k, name in enumerate(self.fns):
            col = table[:, k]
            stats[f"rewards/{name}/mean"] = torch.nanmean(col)
            stats[f"rewards/{name}/std"] = col[~col.isnan()].std() if (~col.isnan()).sum() > 1 else torch.tensor(0.0)
        self.metrics.add("train", {k: float(v) for k, v in stats.items()})
        return Rollout(cycle, seqs, tensors, sum(len(t) for _, t in seqs))

    def batches(self, step: int, micro_bs: int, accum: int, rank: int, world: int) -> list[dict]:
        cycle = step // self.cfg.num_iterations
        if self.buffer is None or self.buffer.cycle != cycle:
            self.buffer = self.rollout(cycle, micro_bs * accum * world)
        buf, out = self.buffer, []
        for s in micro_slices(0, micro_bs, accum, rank, world):
            idx = list(s)
            batch = pack([buf.seqs[i] for i in idx], self.r.rows)
            batch["advantages"] = buf.tensors["advantages"][idx]
            for key in ("old_logps", "ref_logps"):
                if key in buf.tensors:
                    batch[key] = torch.cat([buf.tensors[key][i] for i in idx])
            batch["num_items"] = torch.tensor(buf.n_tokens / (accum * world), dtype=torch.float32)
            out.append(batch)
        return out

    def objective(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        c = self.cfg
        lp, ent, _ = policy_logps(model, batch, c.temperature, entropy=True)
        lengths = batch["answer_tokens"].to(lp.device)
        logps = to_padded(lp, lengths)
        mask = to_padded(torch.ones_like(lp), lengths).bool()
        old = to_padded(batch["old_logps"].to(lp.device), lengths) if "old_logps" in batch else logps.detach()
        ref = to_padded(batch["ref_logps"].to(lp.device), lengths) if "ref_logps" in batch else None
        loss, stats = grpo_loss(logps, old, batch["advantages"].to(lp.device), mask, loss_type=c.loss_type,
                                epsilon=c.epsilon, epsilon_high=c.epsilon_high or c.epsilon, beta=c.beta,
                                ref_logps=ref, max_completion_length=c.max_completion_length,
                                num_items=float(batch["num_items"]), kl_bias_correction=c.kl_bias_correction)
        b = len(lengths)
        self.metrics.add("train", {"entropy": ent.mean(), **stats}, weight=b)
        return loss, b


# ---- PPO -------------------------------------------------------------------------------------------

class PPO:
    """PPO's `train_batches` (rollouts, KL-penalised rewards, GAE) and objective (clipped policy + value loss)."""

    def __init__(self, rollouts: Rollouts, cfg, reward: Callable[[list[tuple], list[str], list[Prompt]], torch.Tensor],
                 ref_model: nn.Module | None, micro_bs: int, seed: int, metrics: StepMetrics):
        self.r, self.cfg, self.reward, self.ref_model = rollouts, cfg, reward, ref_model
        self.micro_bs, self.seed, self.metrics = micro_bs, seed, metrics
        self.kl_coef = cfg.kl_coef
        self.buffer: Rollout | None = None

    @property
    def cycle_steps(self) -> int:
        return self.cfg.num_ppo_epochs * self.cfg.num_mini_batches

    def rollout(self, cycle: int, minibatch: int) -> Rollout:
        c, policy = self.cfg, self.r.policy
        n = minibatch * c.num_mini_batches
        was_training = policy.training
        policy.eval()
        prompts, ids, texts = self.r.sample(cycle, n, 1)
        seqs = [(p.ids, t) for p, t in zip(prompts, ids)]
        logps, values = _per_sequence(policy, seqs, self.micro_bs, c.temperature, values=True, rows=self.r.rows)
        ref, _ = _per_sequence(policy, seqs, self.micro_bs, c.temperature,
                               reference=self.ref_model if self.ref_model is not None else True, rows=self.r.rows)
        policy.train(was_training)
        scores = self.reward(seqs, texts, prompts).float()
        eos = torch.tensor([self.r.ends_with_eos(t) for t in ids])
        if c.missing_eos_penalty is not None:
            scores = scores - c.missing_eos_penalty * (~eos).float()
        a = torch.tensor([len(t) for t in ids])
        width = int(a.max())
        LP, REF = to_padded(torch.cat(logps), a, width), to_padded(torch.cat(ref), a, width)
        V = to_padded(torch.cat(values), a + 1, width + 1)[:, :width]
        idx = torch.arange(width)[None]
        mask, vmask = idx < a[:, None], idx <= a[:, None]
        rewards, kl = ppo_rewards(LP, REF, scores, a - 1, kl_coef=self.kl_coef, estimator=c.kl_estimator)
        if c.whiten_rewards:
            rewards = masked_whiten(rewards, vmask, shift_mean=False).masked_fill(~vmask, 0)
        adv, returns = gae(rewards, V, c.gamma, c.lam)
        adv = masked_whiten(adv, mask).masked_fill(~mask, 0)
        seq_kl = (kl * mask).sum(1)
        err = returns - V
        explained = 1 - masked_mean((err - masked_mean(err, vmask)) ** 2, vmask) / \
            masked_mean((returns - masked_mean(returns, vmask)) ** 2, vmask).clamp(min=1e-8)
        self.metrics.add("train", {"objective/scores": scores.mean(), "objective/kl": seq_kl.mean(),
                                   "objective/rlhf_reward": (scores - self.kl_coef * seq_kl).mean(),
                                   "objective/entropy": (-LP * mask).sum(1).mean(), "kl_coef": self.kl_coef,
                                   "val/explained_var": explained, "eos_ratio": eos.float().mean()})
        if c.target_kl is not None:  # Ziegler et al.'s adaptive controller, on this batch's KL
            error = float(np.clip(float(seq_kl.mean()) / c.target_kl - 1, -0.2, 0.2))
            self.kl_coef *= 1 + error * n / c.horizon
        tensors = {"logps": LP, "values": V, "advantages": adv, "returns": returns, "lengths": a}
        return Rollout(cycle, seqs, tensors, int(a.sum()))

    def batches(self, step: int, micro_bs: int, accum: int, rank: int, world: int) -> list[dict]:
        c = self.cfg
        cycle, i = divmod(step, self.cycle_steps)
        minibatch = micro_bs * accum * world
        if self.buffer is None or self.buffer.cycle != cycle:
            self.buffer = self.rollout(cycle, minibatch)
        epoch, mb = divmod(i, c.num_mini_batches)
        n = len(self.buffer.seqs)
        perm = np.random.default_rng([self.seed, cycle, epoch, PPO_KEY]).permutation(n)
        rows = perm[mb * minibatch:(mb + 1) * minibatch]
        t, out = self.buffer.tensors, []
        for s in micro_slices(0, micro_bs, accum, rank, world):
            sel = torch.as_tensor(rows[list(s)])
            batch = pack([self.buffer.seqs[j] for j in sel.tolist()], self.r.rows)
            for key in ("logps", "values", "advantages", "returns"):
                batch[f"old_{key}"] = t[key][sel]
            out.append(batch)
        return out

    def objective(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        c = self.cfg
        lp, ent, v = policy_logps(model, batch, c.temperature, entropy=True, values=True)
        dev = lp.device
        a = batch["answer_tokens"].to(dev)
        width = batch["old_logps"].shape[1]
        logps = to_padded(lp, a, width)
        values = to_padded(v, a + 1, width + 1)[:, :width]
        idx = torch.arange(width, device=dev)[None]
        mask, vmask = idx < a[:, None], idx <= a[:, None]
        loss, stats = ppo_loss(logps, batch["old_logps"].to(dev), batch["old_advantages"].to(dev), mask, values,
                               batch["old_values"].to(dev), batch["old_returns"].to(dev), vmask,
                               cliprange=c.cliprange, cliprange_value=c.cliprange_value, vf_coef=c.vf_coef)
        self.metrics.add("train", {"policy/entropy": ent.mean(), "policy/clipfrac": stats["clipfrac"],
                                   "policy/approxkl": stats["approx_kl"], "loss/policy": stats["policy_loss"],
                                   "loss/value": stats["value_loss"], "val/clipfrac": stats["value_clipfrac"]},
                         weight=len(a))
        return loss, len(a)

    def state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def load_state(self, state: dict) -> None:
        self.kl_coef = float(state.get("kl_coef", self.kl_coef))


def reward_model_scorer(rm: nn.Module, micro_bs: int) -> Callable:
    """Score (prompt, completion) sequences with a frozen RewardModel, in packed chunks."""
    @torch.no_grad()
    def scorer(seqs: list[tuple], texts: list[str], prompts: list[Prompt]) -> torch.Tensor:
        out = [reward_scores(rm, pack(seqs[lo:lo + micro_bs])).float().cpu() for lo in range(0, len(seqs), micro_bs)]
        return torch.cat(out)
    return scorer


def function_scorer(name: str, fn: RewardFn) -> Callable:
    """Score completions with a reward function (None counts as 0)."""
    def scorer(seqs: list[tuple], texts: list[str], prompts: list[Prompt]) -> torch.Tensor:
        values = score({name: fn}, [p.text for p in prompts], texts, columns([p.record for p in prompts], 1))[name]
        return torch.tensor([0.0 if math.isnan(v) else v for v in values])
    return scorer

