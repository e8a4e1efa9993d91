"""Objectives and batches on preference pairs: the pairwise reward model and DPO.

A micro-batch of b pairs is one packed row of 2b sequences, the b chosen answers then the b
rejected ones, each after its prompt. Batches are a pure function of (seed, step), like fine-tuning's,
so a resumed run sees the same pairs.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from lmforge.align.data import Pair
from lmforge.align.losses import dpo_loss, reward_loss
from lmforge.align.models import pack, policy_logps, reward_scores, seq_sum, unwrap
from lmforge.train.metrics import StepMetrics


def collate_pairs(pairs: list[Pair], index: list[int] | None = None, rows: bool = False) -> dict[str, torch.Tensor]:
    """A batch of [chosen..., rejected...] (one packed row, or `rows`); `pair_index` says which pairs (for
    precomputed reference log-probs)."""
    batch = pack([(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs], rows)
    batch["n_pairs"] = torch.tensor(len(pairs))
    if all(p.margin is not None for p in pairs):
        batch["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
    if index is not None:
        batch["pair_index"] = torch.tensor(index)
    return batch


@dataclass
class EpochOrder:
    """Item u of an endless stream: epoch u // n in default_rng([seed, epoch]).permutation(n) order."""
    n: int
    seed: int
    _perms: dict = field(default_factory=dict, repr=False)

    def __getitem__(self, u: int) -> int:
        epoch = u // self.n
        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            if len(self._perms) > 2:
                del self._perms[min(self._perms)]
        return int(self._perms[epoch][u % self.n])


def micro_slices(step: int, micro_bs: int, accum: int, rank: int, world: int) -> Iterator[range]:
    """Stream positions of this rank's micro-batches of `step` (laid out as the engine's other batches are)."""
    base = step * micro_bs * accum * world
    for m in range(accum):
        lo = base + (m * world + rank) * micro_bs
        yield range(lo, lo + micro_bs)


def pair_batches(pairs: list[Pair], seed: int, rows: bool = False) -> Callable:
    """The engine's `train_batches` over `pairs`."""
    order = EpochOrder(len(pairs), seed)

    def batches(step: int, micro_bs: int, accum: int, rank: int, world: int) -> list[dict]:
        out = []
        for s in micro_slices(step, micro_bs, accum, rank, world):
            index = [order[u] for u in s]
            out.append(collate_pairs([pairs[i] for i in index], index, rows))
        return out
    return batches


def eval_pair_batches(pairs: list[Pair], rows: bool = False) -> Callable:
    """The engine's `eval_batches`: the held-out pairs in order; rank r takes batches r, r + world, ..."""
    def batches(micro_bs: int, rank: int, world: int):
        starts = range(0, len(pairs), micro_bs)
        for lo in starts[rank::world]:
            yield collate_pairs(pairs[lo:lo + micro_bs], rows=rows)
    return batches


def pair_tokens(batch: dict) -> int:
    return int(batch["n_tokens"])


def _mode() -> str:
    # The engine evaluates under no_grad; training steps run with gradients.
    return "train" if torch.is_grad_enabled() else "eval"


def reward_objective(center_rewards: float | None, metrics: StepMetrics):
    """Bradley-Terry loss on a packed pair batch; logs accuracy, margin and mean reward."""
    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        b = int(batch["n_pairs"])
        scores = reward_scores(model, batch)
        chosen, rejected = scores[:b], scores[b:]
        margin = batch.get("margin")
        loss = reward_loss(chosen, rejected, None if margin is None else margin.to(scores.device), center_rewards)
        mode = _mode()  # read before no_grad, which would make every step look like evaluation
        with torch.no_grad():
            metrics.add(mode, {"accuracy": (chosen > rejected).float().mean(),
                                  "margin": (chosen - rejected).mean(), "mean_reward": scores.mean()}, weight=b)
        return loss, b
    return objective


def answer_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probs per sequence (2b,), answer token counts (2b,))."""
    lp, _, _ = policy_logps(model, batch)
    n = len(batch["answer_tokens"])
    return seq_sum(lp, batch["seg"].to(lp.device), n), batch["answer_tokens"].to(lp.device)


@torch.no_grad()
def reference_logps(model: nn.Module, ref_model: nn.Module | None, batch: dict) -> torch.Tensor:
    """The reference's summed answer log-probs: a separate frozen model, or this LoRA policy with its adapter off."""
    if ref_model is not None:
        return answer_logps(ref_model, batch)[0]
    with unwrap(model).reference():
        return answer_logps(model, batch)[0]


def dpo_objective(beta: float, loss_type: str, label_smoothing: float, ref_model: nn.Module | None,
                  ref_table: torch.Tensor | None, metrics: StepMetrics):
    """DPO (and its variants) on a packed pair batch; logs TRL's rewards/* metrics.

    `ref_table` (n, 2) holds precomputed reference log-probs of the training pairs; held-out batches, and
    every batch without it, get theirs from the reference forward."""
    def objective(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        b = int(batch["n_pairs"])
        logps, tokens = answer_logps(model, batch)
        if ref_table is not None and "pair_index" in batch:
            ref = ref_table[batch["pair_index"]].T.reshape(-1).to(logps.device)
        else:
            ref = reference_logps(model, ref_model, batch)
        losses, r_chosen, r_rejected = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=beta,
                                                loss_type=loss_type, label_smoothing=label_smoothing,
                                                chosen_tokens=tokens[:b], rejected_tokens=tokens[b:])
        metrics.add(_mode(), {"rewards/chosen": r_chosen.mean(), "rewards/rejected": r_rejected.mean(),
                              "rewards/accuracies": (r_chosen > r_rejected).float().mean(),
                              "rewards/margins": (r_chosen - r_rejected).mean(),
                              "logps/chosen": logps[:b].detach().mean(), "logps/rejected": logps[b:].detach().mean()},
                    weight=b)
        return losses.mean(), b
    return objective


def pairs_fingerprint(pairs: list[Pair]) -> str:
    """A hash of the pairs' tokens: a cached reference computed on other data is not reused."""
    h = hashlib.sha256()
    for p in pairs:
        for a in (p.prompt, p.chosen, p.rejected):
            h.update(a.tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(path: Path, pairs: list[Pair], model: nn.Module, ref_model: nn.Module | None,
                         micro_bs: int) -> torch.Tensor:
    """(n, 2) reference log-probs [chosen, rejected] of `pairs`, read from `path` or computed once and saved there."""
    from safetensors.torch import load_file, save_file

    key = pairs_fingerprint(pairs)
    if path.is_file():
        saved = load_file(str(path))
        if f"train.{key}" in saved:
            return saved[f"train.{key}"]
    was_training = model.training
    model.eval()
    out = []
    for lo in range(0, len(pairs), micro_bs):
        chunk = pairs[lo:lo + micro_bs]
        ref = reference_logps(model, ref_model, collate_pairs(chunk)).float().cpu()
        out.append(torch.stack([ref[:len(chunk)], ref[len(chunk):]], dim=1))
    model.train(was_training)
    table = torch.cat(out)
    tmp = path.with_suffix(".tmp")
    save_file({f"train.{key}": table}, str(tmp))
    tmp.replace(path)
    return table
