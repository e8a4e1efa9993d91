"""lmforge's alignment maths against TRL's own code, on a tiny Llama and fixed batches, in fp32.

Each test builds the TRL trainer that defines the objective (trl 1.16 `DPOTrainer`, `RewardTrainer`,
`GRPOTrainer`), feeds it exactly the token ids lmforge sees, and compares losses, gradients, per-token
log-probs and logged metrics with lmforge's (`lmforge.align.pairs`, `lmforge.align.losses`,
`lmforge.align.models`). PPO left TRL after 0.29, so its reference computation is transcribed below.

The pieces differ in how they lay a batch out, and the tests rely on the results not depending on it:
lmforge packs every sequence of a micro-batch into one row (position ids restarting at 0, no attention
mask), TRL pads (right-padded pairs; left-padded prompts for GRPO, with positions not restarting, which
RoPE's relative positions make irrelevant up to rounding).
"""
from __future__ import annotations

import copy
import string

import numpy as np
import pytest
import torch


def close(name: str, ours, theirs, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    """assert_close, printing the largest |lmforge - TRL| (shown with pytest -s)."""
    ours, theirs = torch.as_tensor(ours).detach().double(), torch.as_tensor(theirs).detach().double()
    assert ours.shape == theirs.shape, f"{name}: shapes {tuple(ours.shape)} != {tuple(theirs.shape)}"
    diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
    print(f"{name}: max |diff| {diff:.3g}")
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---- the tiny model and its tokenizer --------------------------------------------------------------------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A character tokenizer over string.printable with EOS `<|endoftext|>` and a separate pad token.

    The pad token is not EOS: a sequence classifier (TRL's reward model) scores the last token that is not
    the pad token, so with pad == EOS it would skip the EOS that ends every answer."""
    from transformers import AutoTokenizer

    from lmforge.tokens.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("align-trl-tok")
    build_char_tokenizer(string.printable, d)
    t = AutoTokenizer.from_pretrained(d)
    t.add_special_tokens({"pad_token": "<|pad|>"})
    assert t.eos_token_id != t.pad_token_id
    return t


def llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                       attn_implementation="sdpa", **kw)


@pytest.fixture(scope="module")
def base_lm(tok):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tok)).float().train()


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def trainable_grads(model, prefix: str = "") -> dict[str, torch.Tensor]:
    return {n.removeprefix(prefix): p.grad.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad and p.grad is not None}


def compare_grads(name: str, ours: dict, theirs: dict, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    assert ours.keys() == theirs.keys() and ours, f"{name}: parameters {sorted(ours)[:3]} vs {sorted(theirs)[:3]}"
    assert sum(float(g.norm()) for g in theirs.values()) > 1e-4, f"{name}: TRL's gradients vanish; nothing tested"
    worst = max(ours, key=lambda k: float((ours[k] - theirs[k]).abs().max()))
    rel = (sum(float((ours[k] - theirs[k]).norm()) ** 2 for k in ours) ** 0.5
           / sum(float(theirs[k].norm()) ** 2 for k in ours) ** 0.5)
    print(f"{name} grads: |ours - TRL| / |TRL| over all {len(ours)} tensors {rel:.3g}; "
          f"largest |grad| {max(float(g.abs().max()) for g in theirs.values()):.3g}")
    close(f"{name} grads (worst: {worst})", ours[worst], theirs[worst], atol=atol, rtol=rtol)
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=atol, rtol=rtol, msg=lambda m: f"{name} {k}: {m}")


def trl_args(cls, tmp_path, **kw):
    return cls(output_dir=str(tmp_path / "trl-out"), use_cpu=True, bf16=False, fp16=False, report_to=[],
               disable_dropout=True, **kw)


# ---- DPO ------------------------------------------------------------------------------------------------

PAIRS_TEXT = {  # prompts and answers of different lengths, so TRL pads both chosen and rejected rows
    "prompt": ["Hello there, ", "Q: 2+2? A:", "x"],
    "chosen": ["general Kenobi", " 4", "yz wq"],
    "rejected": ["bye", " five!", "y"],
}


@pytest.fixture(scope="module")
def lora_policy(base_lm):
    """The PEFT LoRA policy, its lora_B initialised NON-zero so that policy != reference (adapter off)."""
    from peft import get_peft_model

    lm = get_peft_model(copy.deepcopy(base_lm), lora_config())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return lm


def dpo_trainer(tok, base_lm, lora_policy, tmp_path, loss_type: str, beta: float, label_smoothing: float):
    """TRL's DPOTrainer on PAIRS_TEXT with the same weights as `lora_policy`.

    TRL is given the plain model and a `peft_config`: it then adds a fresh adapter and takes the reference
    with the adapter disabled, as lmforge does. (Given an already-wrapped PeftModel, trl 1.16 instead copies
    its adapter into a frozen "ref" adapter and uses that as the reference.) The LoRA weights are copied
    in afterwards."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = trl_args(DPOConfig, tmp_path, loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing,
                    max_length=4096, per_device_train_batch_size=len(PAIRS_TEXT["prompt"]))
    trainer = DPOTrainer(model=copy.deepcopy(base_lm), args=args, train_dataset=Dataset.from_dict(PAIRS_TEXT),
                         processing_class=tok, peft_config=lora_config())
    assert list(trainer.model.peft_config) == ["default"] and trainer.ref_model is None
    ours = dict(lora_policy.named_parameters())
    with torch.no_grad():
        for n, p in trainer.model.named_parameters():
            p.copy_(ours[n])
    for (n, a), (m, b) in zip(lora_policy.state_dict().items(), trainer.model.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    trainer.model.train()
    return trainer


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [("sigmoid", 0.1, 0.0), ("hinge", 0.1, 0.0),
                                                            ("ipo", 0.1, 0.0), ("robust", 0.1, 0.1)])
def test_dpo_matches_trl(tok, base_lm, lora_policy, tmp_path, loss_type, beta, label_smoothing):
    from lmforge.align.data import Pair
    from lmforge.align.models import PolicyModel
    from lmforge.align.pairs import collate_pairs, dpo_objective
    from lmforge.train.metrics import StepMetrics

    trainer = dpo_trainer(tok, base_lm, lora_policy, tmp_path, loss_type, beta, label_smoothing)
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(rows) == len(PAIRS_TEXT["prompt"])
    # TRL appends EOS to both answers, as lmforge's Renderer does; the pairs below are TRL's own token ids.
    for r in rows:
        assert r["chosen_ids"][-1] == r["rejected_ids"][-1] == tok.eos_token_id
    pairs = [Pair(np.asarray(r["prompt_ids"], np.int32), np.asarray(r["chosen_ids"], np.int32),
                  np.asarray(r["rejected_ids"], np.int32)) for r in rows]
    for p, text in zip(pairs, PAIRS_TEXT["prompt"]):
        assert p.prompt.tolist() == tok(text)["input_ids"]

    # TRL
    batch = trainer.data_collator(rows)
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(trainer.model)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # lmforge, on a copy of the same policy
    policy = PolicyModel(copy.deepcopy(lora_policy)).train()
    metrics = StepMetrics()
    objective = dpo_objective(beta, loss_type, label_smoothing, None, None, metrics)
    loss, n = objective(policy, collate_pairs(pairs))
    assert n == len(pairs)
    policy.zero_grad(set_to_none=True)
    loss.backward()
    ours = metrics.take("train")

    assert abs(trl_metrics["rewards/margins"]) > 1e-3, "policy == reference: the LoRA init did not take"
    close(f"dpo[{loss_type}] loss", loss, trl_loss)
    compare_grads(f"dpo[{loss_type}]", trainable_grads(policy, "lm."), trl_grads)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"):
        close(f"dpo[{loss_type}] {key}", ours[key], trl_metrics[key])


# ---- reward model ------------------------------------------------------------------------------------------

REWARD_TEXT = {
    "prompt": ["The sky is", "2+2=", "Say hi:", "q"],
    "chosen": [" blue.", "4", " hi there", "ok"],
    "rejected": [" green, I think", "5", " no", "not ok at all"],
    "margin": [0.5, 0.0, 1.5, -0.25],
}


@pytest.fixture(scope="module")
def reward_lm(tok):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(2)
    m = LlamaForSequenceClassification(llama_config(tok, num_labels=1)).float().train()
    with torch.no_grad():  # a score head large enough that the scores, and their order, are not noise
        m.score.weight.normal_(0, 1.0)
    return m


@pytest.mark.parametrize("variant", ["plain", "margin", "center"])
def test_reward_matches_trl(tok, reward_lm, tmp_path, variant):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from lmforge.align.data import Pair
    from lmforge.align.models import RewardModel, pack, reward_scores
    from lmforge.align.pairs import collate_pairs, reward_objective
    from lmforge.train.metrics import StepMetrics

    center = 0.01 if variant == "center" else None
    eos = tok.eos_token_id
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = [enc(p) for p in REWARD_TEXT["prompt"]]
    chosen = [enc(c) + [eos] for c in REWARD_TEXT["chosen"]]
    rejected = [enc(r) + [eos] for r in REWARD_TEXT["rejected"]]
    margins = REWARD_TEXT["margin"] if variant == "margin" else [None] * len(prompts)
    pairs = [Pair(np.asarray(p, np.int32), np.asarray(c, np.int32), np.asarray(r, np.int32), m)
             for p, c, r, m in zip(prompts, chosen, rejected, margins)]
    columns = {"chosen_ids": [p + c for p, c in zip(prompts, chosen)],
               "rejected_ids": [p + r for p, r in zip(prompts, rejected)]}
    if variant == "margin":
        columns["margin"] = REWARD_TEXT["margin"]

    # TRL: pre-tokenized prompt+answer rows, right-padded
    args = trl_args(RewardConfig, tmp_path, center_rewards_coefficient=center, max_length=4096,
                    per_device_train_batch_size=len(pairs))
    trainer = RewardTrainer(model=copy.deepcopy(reward_lm), args=args, train_dataset=Dataset.from_dict(columns),
                            processing_class=tok)
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(len(pairs))]
    assert [r["chosen_ids"] for r in rows] == columns["chosen_ids"]
    batch = trainer.data_collator(rows)
    assert ("margin" in batch) == (variant == "margin")
    trainer.model.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = trainable_grads(trainer.model)
    trl_accuracy = trainer._metrics["train"]["accuracy"][-1]
    trl_margin = trainer._metrics["train"]["margin"][-1]
    with torch.no_grad():
        trl_scores = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]

    # lmforge: all 2b sequences packed into one row
    rm = RewardModel(copy.deepcopy(reward_lm)).train()
    metrics = StepMetrics()
    collated = collate_pairs(pairs)
    assert ("margin" in collated) == (variant == "margin")
    loss, n = reward_objective(center, metrics)(rm, collated)
    assert n == len(pairs)
    rm.zero_grad(set_to_none=True)
    loss.backward()
    # The values only; which bucket they land in is test_reward_metrics_are_logged_as_train's business.
    ours = {**metrics.take("eval"), **metrics.take("train")}
    with torch.no_grad():
        scores = reward_scores(rm, collated)
        single = torch.cat([reward_scores(rm, pack([(p.prompt, p.chosen)])) for p in pairs]
                           + [reward_scores(rm, pack([(p.prompt, p.rejected)])) for p in pairs])

    assert float(trl_scores.std()) > 0.05, "scores too alike to test the accuracy"
    close(f"reward[{variant}] scores packed vs unpacked (lmforge)", scores, single)
    close(f"reward[{variant}] scores", scores, trl_scores)
    close(f"reward[{variant}] loss", loss, trl_loss)
    compare_grads(f"reward[{variant}]", trainable_grads(rm, "lm."), trl_grads)
    assert ours["accuracy"] == pytest.approx(trl_accuracy, abs=1e-9)
    close(f"reward[{variant}] margin metric", ours["margin"], trl_margin)


def test_reward_metrics_are_logged_as_train(tok, reward_lm):
    """A training step (gradients on) logs its accuracy/margin/mean_reward under "train", as DPO's do, and as
    TRL logs them; an evaluation (no_grad) under "eval"."""
    from lmforge.align.data import Pair
    from lmforge.align.models import RewardModel
    from lmforge.align.pairs import collate_pairs, reward_objective
    from lmforge.train.metrics import StepMetrics

    pairs = [Pair(np.array([70, 71]), np.array([72, tok.eos_token_id]), np.array([73, 74, tok.eos_token_id]))]
    rm = RewardModel(copy.deepcopy(reward_lm)).train()
    metrics = StepMetrics()
    objective = reward_objective(None, metrics)
    loss, _ = objective(rm, collate_pairs(pairs))
    loss.backward()
    train, evaluated = metrics.take("train"), metrics.take("eval")
    assert set(train) == {"accuracy", "margin", "mean_reward"} and not evaluated, (
        f"a training step logged train={sorted(train)} eval={sorted(evaluated)}")
    with torch.no_grad():
        objective(rm, collate_pairs(pairs))
    assert set(metrics.take("eval")) == {"accuracy", "margin", "mean_reward"} and not metrics.take("train")


# ---- GRPO -------------------------------------------------------------------------------------------------

G = 4
GROUP_REWARDS = [1.0, 0.0, 0.5, 2.0,  # an ordinary group
                 3.0, 3.0, 3.0, 3.0,  # zero std: advantages 0, flagged
                 -1.0, 4.0, 0.25, 0.25]


@pytest.fixture(scope="module")
def grpo(tok, base_lm, tmp_path_factory):
    """A real GRPOTrainer on a copy of `base_lm`, with a reward function that returns GROUP_REWARDS."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def fixed_rewards(completions, **kwargs):
        assert len(completions) == len(GROUP_REWARDS)
        return list(GROUP_REWARDS)

    args = trl_args(GRPOConfig, tmp_path_factory.mktemp("grpo"), per_device_train_batch_size=len(GROUP_REWARDS),
                    num_generations=G, max_completion_length=8, beta=0.0, epsilon=0.2, epsilon_high=0.28,
                    temperature=1.0)
    trainer = GRPOTrainer(model=copy.deepcopy(base_lm), reward_funcs=fixed_rewards, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["ab", "cde", "f"]}), processing_class=tok)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's training loop; read by _compute_loss
    assert trainer.args.steps_per_generation == 1 and trainer.accelerator.num_processes == 1
    for (n, a), (m, b) in zip(base_lm.state_dict().items(), trainer.model.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    return trainer


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(grpo, scale):
    from lmforge.align.losses import group_advantages

    grpo.scale_rewards, grpo.beta = scale, 0.0
    prompts = [{"prompt": p} for p in ("ab", "cde", "f") for _ in range(G)]
    out = grpo._generate_and_score_completions(prompts)
    ours, zero_std = group_advantages(torch.tensor(GROUP_REWARDS), G, scale)
    close(f"group_advantages[{scale}]", ours, out["advantages"].cpu())
    assert float(zero_std.float().mean()) == pytest.approx(grpo._metrics["train"]["frac_reward_zero_std"][-1])


def grpo_inputs(tok):
    """A fixed GRPO batch laid out as TRL's: prompts left-padded, completions right-padded (one at full width)."""
    prompts = [[70, 71], [72, 73, 74, 75], [76], [77, 78, 79]]
    completions = [[10, 11, 12, 13, 14, 15], [20, 21, 22], [30, tok.eos_token_id], [40, 41, 42, 43, 44]]
    P, T = max(map(len, prompts)), max(map(len, completions))
    pad = tok.pad_token_id
    return prompts, completions, {
        "prompt_ids": torch.tensor([[pad] * (P - len(p)) + p for p in prompts]),
        "prompt_mask": torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts]),
        "completion_ids": torch.tensor([c + [pad] * (T - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions]),
    }


def grpo_case(tok, base_lm, grpo, loss_type: str, beta: float, bias_correction: bool = False,
              on_policy: bool = False) -> dict:
    """lmforge's grpo_loss and TRL's GRPOTrainer._compute_loss on the batch of `grpo_inputs`: losses, gradients,
    stats. Off-policy, the old log-probs are fixed values away from the current ones (so both sides of the clip
    are reached); on-policy they are the current ones, detached (num_iterations 1)."""
    from lmforge.align.losses import grpo_loss
    from lmforge.align.models import PolicyModel, pack, policy_logps, to_padded

    prompts, completions, inputs = grpo_inputs(tok)
    mask = inputs["completion_mask"].bool()
    B, T = mask.shape
    n_tokens = int(mask.sum())

    # lmforge's per-token log-probs: one packed row, then padded to TRL's completion width
    policy = PolicyModel(copy.deepcopy(base_lm)).train()
    batch = pack(list(zip(prompts, completions)))
    lp, _, _ = policy_logps(policy, batch)
    logps = to_padded(lp, batch["answer_tokens"], T)

    # TRL's, from the trainer's own forward over the padded batch
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        trl_logps = grpo._get_per_token_logps_and_entropies(grpo.model, input_ids, attention_mask, T)[0]

    # Old and reference log-probs zero at padding, as TRL's own are; advantages of both signs.
    g = torch.Generator().manual_seed(3)
    old = logps.detach().clone()
    if not on_policy:
        old = (old + 0.35 * torch.randn(B, T, generator=g)).masked_fill(~mask, 0)
    ref = (logps.detach() + 0.5 * torch.randn(B, T, generator=g)).masked_fill(~mask, 0)
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1])

    grpo.loss_type, grpo.beta, grpo.epsilon_low, grpo.epsilon_high = loss_type, beta, 0.2, 0.28
    grpo.args.use_bias_correction_kl = bias_correction
    trl_inputs = {**inputs, "advantages": advantages, "old_per_token_logps": old,
                  "num_items_in_batch": torch.tensor(float(n_tokens))}
    if beta:
        trl_inputs["ref_per_token_logps"] = ref
    grpo.model.zero_grad(set_to_none=True)
    trl_loss = grpo.compute_loss(grpo.model, trl_inputs)
    trl_loss.backward()

    loss, stats = grpo_loss(logps, old, advantages, mask, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28,
                            beta=beta, ref_logps=ref if beta else None,
                            max_completion_length=grpo.max_completion_length, num_items=float(n_tokens),
                            kl_bias_correction=bias_correction)
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return {"mask": mask, "logps": logps.detach(), "trl_logps": trl_logps, "old": old, "loss": loss,
            "trl_loss": trl_loss, "grads": trainable_grads(policy, "lm."), "trl_grads": trainable_grads(grpo.model),
            "stats": stats, "trl_metrics": {k: v[-1] for k, v in grpo._metrics["train"].items()}}


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_grpo_loss_matches_trl(tok, base_lm, grpo, loss_type, beta):
    """TRL with use_bias_correction_kl=False (its default, True, is test_grpo_kl_matches_trl_default's)."""
    r = grpo_case(tok, base_lm, grpo, loss_type, beta)
    mask = r["mask"]
    close("grpo per-token logps", r["logps"].masked_fill(~mask, 0), r["trl_logps"].masked_fill(~mask, 0))
    ratio = torch.exp(r["logps"] - r["old"])[mask]
    assert (ratio < 0.8).any() and (ratio > 1.28).any()

    name = f"grpo[{loss_type}, beta={beta}]"
    close(f"{name} loss", r["loss"], r["trl_loss"])
    compare_grads(name, r["grads"], r["trl_grads"])
    stats, trl_metrics = r["stats"], r["trl_metrics"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (("kl",) if beta else ()):
        close(f"{name} {key}", stats[key], trl_metrics[key])
    assert stats["clip_ratio/low_mean"] > 0 and stats["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("on_policy", [True, False])
def test_grpo_kl_matches_trl_default(tok, base_lm, grpo, on_policy):
    """trl 1.16's default use_bias_correction_kl=True weights the per-token KL by the (differentiable) importance
    ratio exp(logps - old_logps): the loss changes off-policy, and the gradient changes even on-policy (ratio 1)."""
    r = grpo_case(tok, base_lm, grpo, "dapo", 0.04, bias_correction=True, on_policy=on_policy)
    name = f"grpo[dapo, beta=0.04, TRL default KL, on_policy={on_policy}]"
    close(f"{name} loss", r["loss"], r["trl_loss"])
    compare_grads(name, r["grads"], r["trl_grads"])


# ---- PPO --------------------------------------------------------------------------------------------------

# Transcribed from trl 0.29.1, trl/experimental/ppo/ppo_trainer.py: INVALID_LOGPROB (line 81), masked_mean /
# masked_var / masked_whiten (lines 246-279), and the rollout's rewards, whitening and GAE in
# PPOTrainer.train (lines 758-794). trl 1.x no longer ships PPO.
INVALID_LOGPROB = 1.0


def _trl029_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def _trl029_masked_var(values, mask, unbiased=True):
    mean = _trl029_masked_mean(values, mask)
    centered_values = values - mean
    variance = _trl029_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def _trl029_masked_whiten(values, mask, shift_mean=True):
    mean, var = _trl029_masked_mean(values, mask), _trl029_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


def trl029_rewards_and_advantages(logprobs, ref_logprobs, values, scores, sequence_lengths, *, kl_coef, kl_estimator,
                                  whiten_rewards, gamma, lam):
    """(rewards, advantages, returns) of a padded rollout, as trl 0.29.1's PPOTrainer computes them.

    `sequence_lengths` is each response's last token index (TRL: first pad index - 1); `values` are the value
    head's outputs at the response positions (TRL: full_value[:, context_length - 1 : -1])."""
    responses_shape = logprobs.shape
    # be very careful with `padding_mask_p1`; see https://excalidraw.com/#json=LWnzG4w2k5DjF_EOL_xPt,e2w3a-hFJ_gX5vOfeyXGTw
    response_idxs = torch.arange(responses_shape[1], device=logprobs.device).repeat(responses_shape[0], 1)
    padding_mask = response_idxs > sequence_lengths.unsqueeze(1)
    logprobs = torch.masked_fill(logprobs, padding_mask, INVALID_LOGPROB)
    ref_logprobs = torch.masked_fill(ref_logprobs, padding_mask, INVALID_LOGPROB)
    sequence_lengths_p1 = sequence_lengths + 1
    padding_mask_p1 = response_idxs > (sequence_lengths_p1.unsqueeze(1))
    values = torch.masked_fill(values, padding_mask_p1, 0)

    # 4. compute rewards
    # Formula used by http://joschu.net/blog/kl-approx.html for the k1 and k3 estimators
    logr = ref_logprobs - logprobs
    kl = -logr if kl_estimator == "k1" else (logr.exp() - 1) - logr  # Else statement is k3
    non_score_reward = -kl_coef * kl
    rewards = non_score_reward.clone()
    actual_start = torch.arange(rewards.size(0), device=rewards.device)
    actual_end = torch.where(sequence_lengths_p1 < rewards.size(1), sequence_lengths_p1, sequence_lengths)
    rewards[actual_start, actual_end] += scores

    # 5. whiten rewards
    if whiten_rewards:
        rewards = _trl029_masked_whiten(rewards, mask=~padding_mask_p1, shift_mean=False)
        rewards = torch.masked_fill(rewards, padding_mask_p1, 0)

    # 6. compute advantages and returns
    lastgaelam = 0
    advantages_reversed = []
    gen_length = responses_shape[1]
    for t in reversed(range(gen_length)):
        nextvalues = values[:, t + 1] if t < gen_length - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], axis=1)
    returns = advantages + values
    advantages = _trl029_masked_whiten(advantages, ~padding_mask)
    advantages = torch.masked_fill(advantages, padding_mask, 0)
    return rewards, advantages, returns


@pytest.mark.parametrize("whiten_rewards", [False, True])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_ppo_rewards_and_advantages_match_trl029(estimator, whiten_rewards):
    from lmforge.align.losses import gae, masked_whiten, ppo_rewards
    from lmforge.align.models import to_padded

    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([7, 3, 1, 5])  # the first response fills the width: its score lands on its last token
    B, T = len(lengths), int(lengths.max())
    kl_coef, gamma, lam = 0.05, 0.99, 0.95
    scores = torch.tensor([1.5, -0.5, 2.0, 0.25])
    # Per-sequence values as the policy produces them: log-probs of its a tokens, values at a + 1 positions.
    lps = [-torch.rand(int(a), generator=g) * 3 for a in lengths]
    refs = [lp + 0.4 * torch.randn(len(lp), generator=g) for lp in lps]
    vals = [torch.randn(int(a) + 1, generator=g) for a in lengths]

    # TRL's padded tensors: garbage past each response (TRL masks it itself), values over the T response positions
    junk = lambda: 5 * torch.randn(B, T, generator=g)  # noqa: E731
    trl_lp, trl_ref, trl_v = junk(), junk(), junk()
    for b, a in enumerate(lengths.tolist()):
        trl_lp[b, :a], trl_ref[b, :a] = lps[b], refs[b]
        trl_v[b, :min(a + 1, T)] = vals[b][:T]
    want_rewards, want_adv, want_returns = trl029_rewards_and_advantages(
        trl_lp, trl_ref, trl_v, scores, lengths - 1, kl_coef=kl_coef, kl_estimator=estimator,
        whiten_rewards=whiten_rewards, gamma=gamma, lam=lam)

    # lmforge, composed as PPO.rollout composes it (src/lmforge/align/rl.py)
    a = lengths
    LP, REF = to_padded(torch.cat(lps), a, T), to_padded(torch.cat(refs), a, T)
    V = to_padded(torch.cat(vals), a + 1, T + 1)[:, :T]
    idx = torch.arange(T)[None]
    mask, vmask = idx < a[:, None], idx <= a[:, None]
    rewards, kl = ppo_rewards(LP, REF, scores, a - 1, kl_coef=kl_coef, estimator=estimator)
    if whiten_rewards:
        rewards = masked_whiten(rewards, vmask, shift_mean=False).masked_fill(~vmask, 0)
    adv, returns = gae(rewards, V, gamma, lam)
    adv = masked_whiten(adv, mask).masked_fill(~mask, 0)

    name = f"ppo[{estimator}, whiten_rewards={whiten_rewards}]"
    close(f"{name} rewards", rewards, want_rewards)
    close(f"{name} advantages", adv, want_adv)
    close(f"{name} returns", returns, want_returns)
