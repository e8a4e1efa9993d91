"""`lmforge eval preference`: how often a model prefers the chosen answer of a preference pair.

A reward model scores each answer directly. A policy is scored by DPO's implicit reward,
beta * (log pi(answer) - log pi_ref(answer)), against a reference model. Either way the result is the
share of pairs where chosen outscores rejected (ties count as misses), the mean margin, and n.
"""
from __future__ import annotations

import torch

from lmforge.align.data import AlignDataConfig, check_preference_file, load_pairs
from lmforge.align.models import PolicyModel, RewardModel
from lmforge.align.pairs import answer_logps, collate_pairs
from lmforge.device import inference_dtype, pick_device
from lmforge.errors import UserError


@torch.no_grad()
def score_preferences(model: str, data: str, reference: str | None = None, *, beta: float = 0.1,
                      max_length: int = 1024, max_examples: int | None = None, batch_size: int = 4,
                      template: str = "auto", device: str = "auto", dtype: str = "auto") -> dict:
    """{"accuracy", "margin", "n", ...} of `model` (a reward model, or a policy with `reference`) on `data`'s pairs."""
    from lmforge.model.load import is_reward_model, load_model, load_tokenizer, resolve

    cfg = AlignDataConfig(path=data, template=template, max_length=max_length, max_prompt_length=max_length - 1,
                          val_size=0, max_examples=max_examples)
    check_preference_file(cfg)
    reward = is_reward_model(model)
    if not reward and reference is None:
        raise UserError(f"{model} is a causal LM, not a reward model: give --reference MODEL (e.g. its base) to score "
                         "it by DPO's implicit reward")
    if reference is not None:
        resolve(reference)  # a bad path fails before any model loads
    dev = pick_device(device)
    dt = inference_dtype(dev, dtype)
    tok = load_tokenizer(model)
    pairs = load_pairs(cfg, tok, seed=0, split=False)
    if reward:
        scorer = RewardModel(load_model(model, dtype=dt, device=dev, head="score", merge_adapter=True)).eval()
        ref = None
    else:
        scorer = PolicyModel(load_model(model, dtype=dt, device=dev, merge_adapter=True)).eval()
        ref = PolicyModel(load_model(reference, dtype=dt, device=dev, merge_adapter=True)).eval()
    margins = []
    for lo in range(0, len(pairs.train), batch_size):
        chunk = pairs.train[lo:lo + batch_size]
        batch = collate_pairs(chunk)
        b = len(chunk)
        if reward:
            s = scorer(batch["input_ids"].to(dev), batch["position_ids"].to(dev), batch["last"].to(dev))
        else:
            s = beta * (answer_logps(scorer, batch)[0] - answer_logps(ref, batch)[0])
        margins.append((s[:b] - s[b:]).float().cpu())
    m = torch.cat(margins)
    return {"accuracy": float((m > 0).float().mean()), "margin": float(m.mean()), "n": len(m),
            "scored_by": "reward model" if reward else f"implicit reward, beta {beta}", "model": model,
            "reference": reference, "data": data, "dtype": str(dt).removeprefix("torch."),
            "data_report": pairs.report.to_dict()}
