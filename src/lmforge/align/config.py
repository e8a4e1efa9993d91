"""`lmforge align` config: the fine-tuning keys (base, method, LoRA, engine) plus one block per algorithm."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge.align.data import AlignDataConfig
from lmforge.config import Strict
from lmforge.train.config import (FinetuneTrainConfig, GuardConfig, LogConfig, LoraConfigSection, QLoraConfigSection,
                                  check_resume)

DPO_LOSSES = ("sigmoid", "robust", "hinge", "ipo")
GRPO_LOSSES = ("grpo", "dr_grpo", "dapo")


class AlignTrainConfig(FinetuneTrainConfig):
    """The engine's keys with alignment defaults: a LoRA learning rate (5e-5), constant, no warmup, Adam's beta2."""

    max_steps: int = Field(200, gt=0)
    micro_batch_size: int = Field(4, gt=0, description="pairs (reward, dpo) or completions (ppo, grpo) per forward")
    lr: float = Field(5e-5, gt=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    beta2: float = 0.999
    eval_every: int = Field(50, ge=0, description="0 disables periodic eval (one still runs at the end)")
    ckpt_every: int = Field(50, ge=0, description="0: only the final checkpoint")


class AlignLora(LoraConfigSection):
    dropout: float = Field(0.0, ge=0, lt=1, description="0 by default: TRL's alignment trainers disable dropout")


class RewardSection(Strict):
    center_rewards: float | None = Field(None, ge=0, description="coefficient of mean((r_chosen + r_rejected)^2)")


class DPOSection(Strict):
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference")
    loss_type: str = Field("sigmoid", description=f"one of {', '.join(DPO_LOSSES)}")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed share of flipped labels (cDPO, robust)")
    precompute_ref: bool = Field(False, description="compute the reference log-probs once, before training, and "
                                                    "keep them in out_dir/ref_logps.safetensors")

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DPO_LOSSES:
            raise ValueError(f"unknown DPO loss_type {v!r}; expected one of {', '.join(DPO_LOSSES)}")
        return v


class SamplingSection(Strict):
    max_completion_length: int = Field(128, gt=0, description="tokens generated per completion at most")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: off")


class GRPOSection(SamplingSection):
    num_generations: int = Field(4, gt=1, description="completions per prompt (the group)")
    rewards: list[str] = Field(["gsm8k", "gsm8k_format"], min_length=1,
                               description="built-in gsm8k / gsm8k_format, or module:function / path.py:function")
    reward_weights: list[float] | None = Field(None, description="one weight per reward function; default all 1")
    scale_rewards: Literal["group", "batch", "none"] = "group"
    loss_type: str = Field("dapo", description=f"one of {', '.join(GRPO_LOSSES)}")
    epsilon: float = Field(0.2, gt=0, lt=1, description="lower clip: ratio >= 1 - epsilon")
    epsilon_high: float | None = Field(None, gt=0, description="upper clip: ratio <= 1 + epsilon_high (default epsilon)")
    beta: float = Field(0.0, ge=0, description="KL to the reference; 0 holds no reference at all")
    kl_bias_correction: bool = Field(True, description="weight the per-token KL by the importance ratio (TRL's "
                                                       "use_bias_correction_kl)")
    num_iterations: int = Field(1, gt=0, description="updates per generated batch (mu)")
    eval_prompts: int = Field(64, ge=0, description="held-out prompts scored (greedy) before and after")

    @field_validator("loss_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in GRPO_LOSSES:
            raise ValueError(f"unknown GRPO loss_type {v!r}; expected one of {', '.join(GRPO_LOSSES)}")
        return v

    @model_validator(mode="after")
    def _weights(self):
        if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
            raise ValueError(f"grpo.reward_weights has {len(self.reward_weights)} weights for "
                             f"{len(self.rewards)} reward functions")
        return self


class PPOSection(SamplingSection):
    reward_model: str | None = Field(None, description="a reward model (lmforge align algorithm=reward run, HF "
                                                       "sequence classifier or SEQ_CLS adapter)")
    reward_function: str | None = Field(None, description="instead of a reward model: module:function or "
                                                          "path.py:function")
    max_completion_length: int = Field(48, gt=0, description="tokens generated per completion at most")
    temperature: float = Field(0.7, gt=0)
    num_ppo_epochs: int = Field(4, gt=0, description="passes over each rollout batch")
    num_mini_batches: int = Field(1, gt=0, description="optimizer steps per pass (each on train.micro_batch_size x "
                                                       "grad_accum completions)")
    kl_coef: float = Field(0.05, ge=0, description="initial per-token KL penalty coefficient")
    kl_estimator: Literal["k1", "k3"] = "k1"
    target_kl: float | None = Field(None, gt=0, description="adaptive KL: steer the per-sequence KL to this value")
    horizon: float = Field(10000, gt=0, description="adaptive KL's horizon (Ziegler et al.)")
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    cliprange: float = Field(0.2, gt=0)
    cliprange_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(None, ge=0, description="subtracted from the score of a completion "
                                                                      "that did not end with EOS")
    eval_prompts: int = Field(32, ge=0, description="held-out prompts scored (greedy) before and after")

    @model_validator(mode="after")
    def _one_reward(self):
        if (self.reward_model is None) == (self.reward_function is None):
            raise ValueError("ppo needs exactly one of ppo.reward_model and ppo.reward_function")
        return self


class AlignConfig(Strict):
    out_dir: Path = Path("runs/align")
    seed: int = 1337
    resume: str = Field("auto", description="auto (from out_dir/checkpoints/latest if any) | never | PATH to a checkpoint")
    algorithm: Literal["reward", "dpo", "ppo", "grpo"]
    base_model: str = Field(description="HF directory, hub id, .gguf file, lmforge run, or smollm2-135m-instruct")
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: AlignLora = AlignLora()
    qlora: QLoraConfigSection = QLoraConfigSection()
    data: AlignDataConfig
    train: AlignTrainConfig = AlignTrainConfig()
    guards: GuardConfig = GuardConfig()
    log: LogConfig = LogConfig()
    reward: RewardSection = RewardSection()
    dpo: DPOSection = DPOSection()
    grpo: GRPOSection = GRPOSection()
    ppo: PPOSection | None = Field(None, description="required for algorithm=ppo (it names the reward)")

    _resume = field_validator("resume")(check_resume)

    def cycle(self) -> int:
        """Optimizer steps per generated batch: PPO's epochs x minibatches, GRPO's iterations, else 1."""
        if self.algorithm == "ppo" and self.ppo is not None:
            return self.ppo.num_ppo_epochs * self.ppo.num_mini_batches
        return self.grpo.num_iterations if self.algorithm == "grpo" else 1

    @model_validator(mode="after")
    def _check(self):
        tc = self.train
        if self.method == "qlora" and tc.parallel == "fsdp":
            raise ValueError("method=qlora does not support train.parallel=fsdp (4-bit weights cannot be sharded); use ddp")
        if self.algorithm == "ppo" and self.ppo is None:
            raise ValueError("algorithm=ppo needs a ppo section with ppo.reward_model or ppo.reward_function")
        if self.algorithm == "grpo":
            batch = tc.micro_batch_size * tc.grad_accum
            if batch % self.grpo.num_generations:
                raise ValueError(f"grpo.num_generations {self.grpo.num_generations} does not divide the batch "
                                 f"train.micro_batch_size x train.grad_accum = {batch}; each step holds whole groups")
        if self.algorithm in ("ppo", "grpo"):
            if tc.compile:
                raise ValueError(f"algorithm={self.algorithm} does not support train.compile (rollout shapes vary)")
            k = self.cycle()
            if tc.ckpt_every % k:
                raise ValueError(f"train.ckpt_every {tc.ckpt_every} is not a multiple of the {k} optimizer steps each "
                                 "generated batch is used for, so a resumed run could not regenerate it")
        return self
