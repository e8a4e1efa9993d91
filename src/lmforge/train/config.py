"""Training configs (pretrain, finetune): one pydantic model per section, validated before any work starts."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmforge.config import Strict
from lmforge.model.config import ModelConfig
from lmforge.train.curriculum import CurriculumConfig
from lmforge.train.deepspeed import merge_deepspeed
from lmforge.train.ewc import EWCConfig
from lmforge.train.sft_data import SFTDataConfig


def check_resume(v: str) -> str:
    """`resume` is auto, never, or a checkpoint directory."""
    if v not in ("auto", "never") and not Path(v, "trainer_state.pt").is_file():
        raise ValueError(f"{v} is not a checkpoint directory (no trainer_state.pt); use auto, never or a path")
    return v


def apply_deepspeed(data: Any) -> Any:
    """The `deepspeed` key's ds_config mapped into `train` before validation (the world size from torchrun's env)."""
    return merge_deepspeed(data, int(os.environ.get("WORLD_SIZE", "1")))


DEEPSPEED_HELP = ("a DeepSpeed ds_config (JSON file path or inline mapping) mapped onto train.* (FSDP2); a one-line "
                  "notice names what was mapped and what was not")


def _is_shard_dir(v: Path) -> bool:
    """A token-shard directory: nanoGPT's train.bin, or a meta.json (a sharded corpus's index)."""
    return (v / "train.bin").is_file() or (v / "meta.json").is_file()


class DataConfig(Strict):
    dir: Path | None = Field(None, description="token shards: a directory with train.bin, val.bin and meta.json "
                                               "(lmforge tokenize, or nanoGPT's prepare.py) or a sharded corpus "
                                               "(tokenize --workers N)")
    mix: dict[Path, float] | None = Field(None, description="instead of dir: {shard dir: weight, ...}; each window's "
                                                            "source is drawn by weight (weights are normalised)")
    # random: nanoGPT-style random windows; sequential: consecutive windows, epoch after epoch.
    sampling: Literal["random", "sequential"] = "random"
    seq_len: int | None = Field(None, gt=1, description="window length; default model.max_seq_len")

    @field_validator("dir")
    @classmethod
    def _exists(cls, v: Path | None) -> Path | None:
        if v is not None and not _is_shard_dir(v):
            raise ValueError(f"{v}/train.bin does not exist (make it with `lmforge tokenize`)")
        return v

    @field_validator("mix")
    @classmethod
    def _sources(cls, v: dict[Path, float] | None) -> dict[Path, float] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("is empty; give {shard dir: weight, ...} or use data.dir")
        for path, weight in v.items():
            if not weight > 0:
                raise ValueError(f"weight of {path} must be > 0, got {weight}")
            if not _is_shard_dir(path):
                raise ValueError(f"source {path} has no train.bin or meta.json (make it with `lmforge tokenize`)")
        return v

    @model_validator(mode="after")
    def _one_source(self):
        if (self.dir is None) == (self.mix is None):
            raise ValueError("give exactly one of data.dir (one corpus) or data.mix ({shard dir: weight})")
        if self.mix is not None and self.sampling == "sequential":
            raise ValueError("data.sampling=sequential is not supported with data.mix; use random")
        return self


class TrainConfig(Strict):
    max_steps: int = Field(1000, gt=0)
    micro_batch_size: int = Field(8, gt=0, description="windows per forward pass on one process")
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    auto_micro_batch: bool = Field(False, description="pretraining: the largest micro_batch_size the memory planner "
                                                      "says fits the device, dividing micro_batch_size x grad_accum "
                                                      "(grad_accum grows to keep the windows per step)")
    lr: float = Field(3e-4, gt=0)
    min_lr: float = Field(3e-5, ge=0)
    warmup_steps: int = Field(100, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(None, gt=0, description="steps over which lr decays to min_lr; default max_steps")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping (the norm is still logged)")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    parallel: Literal["none", "ddp", "fsdp", "hsdp"] = Field("none", description="with torchrun: ddp, fsdp (FSDP2) or "
                                                                       "hsdp (FSDP2 sharded within groups of "
                                                                       "train.shard_degree, replicated across them)")
    shard_degree: int | None = Field(None, gt=0, description="hsdp: processes per sharding group; default one node's "
                                                             "(LOCAL_WORLD_SIZE); must divide the world size")
    cpu_offload: bool = Field(False, description="fsdp/hsdp: sharded parameters, gradients and the optimizer step on the "
                                                 "CPU (FSDP2 CPUOffloadPolicy, ZeRO-3 offload's equivalent)")
    reshard_after_forward: bool = Field(True, description="fsdp/hsdp: false keeps each block's gathered parameters "
                                                          "from forward to backward (ZeRO-2-like: more memory, "
                                                          "fewer all-gathers)")
    threads: int | None = Field(None, gt=0, description="CPU threads for torch; default all cores (per process)")
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(250, ge=0, description="0 disables periodic eval (one still runs at the end)")
    eval_batches: int = Field(20, gt=0)
    ckpt_every: int = Field(1000, ge=0, description="0: only the final checkpoint")
    keep_last: int = Field(3, gt=0, description="checkpoints kept; older ones are deleted")
    async_checkpoint: bool = Field(False, description="write checkpoints in the background (sharded, DCP async_save); "
                                                      "training goes on while they are written")

    @model_validator(mode="after")
    def _check(self):
        if self.min_lr > self.lr and self.schedule != "constant":
            raise ValueError(f"train.min_lr {self.min_lr} is above train.lr {self.lr}")
        sharded = self.parallel in ("fsdp", "hsdp")
        if sharded and self.precision == "fp16":
            raise ValueError(f"train.precision=fp16 is not supported with train.parallel={self.parallel} (no sharded "
                             "loss scaling yet); use bf16")
        if self.cpu_offload and not sharded:
            raise ValueError(f"train.cpu_offload=true needs train.parallel=fsdp or hsdp (got {self.parallel})")
        if self.shard_degree is not None and self.parallel != "hsdp":
            raise ValueError(f"train.shard_degree applies to train.parallel=hsdp only (got {self.parallel})")
        if not self.reshard_after_forward and not sharded:
            raise ValueError(f"train.reshard_after_forward=false needs train.parallel=fsdp or hsdp (got {self.parallel})")
        return self


class GuardConfig(Strict):
    """Troubleshooting made automatic: skip bad updates, roll back, or stop with a reason."""

    skip_nonfinite: bool = True
    spike_factor: float = Field(0.0, ge=0, description="skip a step whose loss exceeds k x running median; 0 disables")
    spike_window: int = Field(100, gt=1)
    spike_warmup: int = Field(50, ge=0, description="steps before spike detection starts")
    max_bad_steps: int = Field(5, gt=0, description="consecutive skipped steps before rollback/stop")
    on_repeated_bad: Literal["rollback", "stop"] = "rollback"
    rollback_lr_factor: float = Field(0.5, gt=0, le=1)
    max_rollbacks: int = Field(3, ge=0)
    oom_retry: bool = True
    # Test hooks: make these (1-based) steps produce a NaN loss / a CUDA out-of-memory error on purpose.
    debug_nan_steps: list[int] = []
    debug_oom_steps: list[int] = []


class LogConfig(Strict):
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "lmforge"
    progress: bool = True


class PretrainConfig(Strict):
    out_dir: Path = Path("runs/pretrain")
    seed: int = 1337
    resume: str = Field("auto", description="auto (from out_dir/checkpoints/latest if any) | never | PATH to a checkpoint")
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: Path | dict | None = Field(None, description=DEEPSPEED_HELP)
    guards: GuardConfig = GuardConfig()
    log: LogConfig = LogConfig()
    curriculum: CurriculumConfig | None = Field(None, description="train windows in curriculum order (train/curriculum.py)")

    _resume = field_validator("resume")(check_resume)
    _deepspeed = model_validator(mode="before")(apply_deepspeed)

    @model_validator(mode="after")
    def _check_curriculum(self):
        cur = self.curriculum
        if cur is not None and (cur.difficulty != "perplexity" or cur.reference_model is None):
            raise ValueError("pretraining's curriculum scores fixed windows by perplexity: set curriculum.difficulty="
                             "perplexity and curriculum.reference_model (length and field are for fine-tuning)")
        if cur is not None and (self.data.mix is not None or self.data.sampling != "random"):
            raise ValueError("curriculum needs data.dir with data.sampling=random (it replaces the sampler)")
        return self


class FinetuneTrainConfig(TrainConfig):
    """The engine's keys with fine-tuning defaults (LoRA's usual lr, no decay, frequent evals)."""

    max_steps: int = Field(300, gt=0)
    micro_batch_size: int = Field(4, gt=0, description="examples per forward pass (packing: rows of data.max_length)")
    lr: float = Field(2e-4, gt=0)
    min_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(50, ge=0, description="0 disables periodic eval (one still runs at the end)")
    eval_batches: int = Field(25, gt=0)
    ckpt_every: int = Field(100, ge=0, description="0: only the final checkpoint")
    keep_last: int = Field(2, gt=0, description="checkpoints kept; older ones are deleted")
    liger: bool = Field(False, description="Liger Triton kernels (RMSNorm, RoPE, SwiGLU); CUDA + pip install liger-kernel")

    @field_validator("auto_micro_batch")
    @classmethod
    def _pretraining_only(cls, v: bool) -> bool:
        if v:
            raise ValueError("is for pretraining; for fine-tuning and alignment run `lmforge plan memory CONFIG "
                             "--device NAME`, which names the micro-batch that fits")
        return v


class LoraConfigSection(Strict):
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16, gt=0, description="scaling is alpha / r (alpha / sqrt(r) with rslora)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"], description="module names, or all-linear (every linear layer but the head)")
    rslora: bool = False


class QLoraConfigSection(Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = Field(True, description="quantise the quantisation constants too (~0.4 bits/param saved)")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: follows train.precision")


class FinetuneConfig(Strict):
    out_dir: Path = Path("runs/finetune")
    seed: int = 1337
    resume: str = Field("auto", description="auto (from out_dir/checkpoints/latest if any) | never | PATH to a checkpoint")
    base_model: str = Field(description="HF directory, hub id, .gguf file, lmforge run, or smollm2-135m-instruct")
    method: Literal["full", "lora", "qlora"] = "lora"
    lora: LoraConfigSection = LoraConfigSection()
    qlora: QLoraConfigSection = QLoraConfigSection()
    data: SFTDataConfig
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    deepspeed: Path | dict | None = Field(None, description=DEEPSPEED_HELP)
    guards: GuardConfig = GuardConfig()
    log: LogConfig = LogConfig()
    ewc: EWCConfig | None = Field(None, description="elastic weight consolidation toward an old task (train/ewc.py)")
    curriculum: CurriculumConfig | None = Field(None, description="train examples in curriculum order (train/curriculum.py)")

    _resume = field_validator("resume")(check_resume)
    _deepspeed = model_validator(mode="before")(apply_deepspeed)

    @model_validator(mode="after")
    def _check(self):
        if self.ewc is not None and self.train.parallel in ("fsdp", "hsdp"):
            raise ValueError(f"ewc supports train.parallel=none or ddp (got {self.train.parallel}: sharded parameters)")
        if self.method == "qlora" and self.train.parallel in ("fsdp", "hsdp"):
            raise ValueError(f"method=qlora does not support train.parallel={self.train.parallel} (4-bit weights cannot "
                             "be sharded); use ddp")
        if self.method == "qlora" and self.train.compile:
            raise ValueError("method=qlora does not support train.compile")
        return self
