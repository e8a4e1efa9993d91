"""`lmforge generate`, `lmforge chat` and `lmforge info`: sampling from any model, and what the runtime sees."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from lmforge.command import Command
from lmforge.config import Strict
from lmforge.model.commands import MODEL_HELP

Device = Literal["auto", "cpu", "cuda", "mps"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
DEVICE_HELP = "where the model runs: auto picks CUDA, then Apple MPS, then the CPU"
DTYPE_HELP = "weights dtype; auto: bfloat16 on CUDA, float32 elsewhere"


class GenerateConfig(Strict):
    model: str = Field(description=MODEL_HELP)
    prompt: str = Field("", description="text to continue (empty: the start of a document)")
    template: Literal["none", "chat", "alpaca"] = Field(
        "none", description="wrap the prompt: chat = one user turn in the model's chat template; alpaca = the "
                            "### Instruction / ### Response template that finetune's alpaca format trains on")
    input: str = Field("", description="with template=alpaca: the ### Input section")
    max_new_tokens: int = Field(200, gt=0, description="longest continuation in tokens")
    temperature: float = Field(0.8, ge=0, description="0 for greedy decoding")
    top_k: int | None = Field(200, ge=0, description="sample from the k most likely tokens (None or 0: all)")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass (None: off)")
    num_samples: int = Field(1, gt=0, description="continuations of the same prompt")
    seed: int = Field(1337, description="sample i draws from its own generator seeded from this")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)


class ChatConfig(Strict):
    model: str = Field(description=MODEL_HELP)
    system: str | None = Field(None, description="system message")
    max_new_tokens: int = Field(256, gt=0, description="longest reply in tokens")
    temperature: float = Field(0.7, ge=0, description="0 for greedy decoding")
    top_p: float | None = Field(0.9, gt=0, le=1, description="nucleus sampling mass (None: off)")
    seed: int = Field(1337, description="turn t samples with seed + t")
    device: Device = Field("auto", description=DEVICE_HELP)
    dtype: DType = Field("auto", description=DTYPE_HELP)


class InfoConfig(Strict):
    """`lmforge info` takes no settings."""


def run_generate(cfg: GenerateConfig) -> int:
    from lmforge.infer import generate_samples

    samples = generate_samples(cfg.model, prompt=cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                               num_samples=cfg.num_samples, seed=cfg.seed, device=cfg.device, template=cfg.template,
                               inp=cfg.input, dtype=cfg.dtype)
    for s in samples:
        print(s.text)
        print(f"--- {s.n_tokens} tokens, " + ("ended with EOS" if s.finished else "cut off at --max-new-tokens"))
    return 0


def run_chat(cfg: ChatConfig) -> int:
    from lmforge.infer import chat

    chat(cfg.model, system=cfg.system, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
         top_p=cfg.top_p, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)
    return 0


def run_info(cfg: InfoConfig) -> int:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    from lmforge.device import device_info

    info = {"python": platform.python_version(), "torch": torch.__version__, **device_info()}
    for dist in ("lmforge", "transformers", "tokenizers", "safetensors", "tensorboard"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            info[dist] = None
    width = max(map(len, info))
    for k, v in info.items():
        print(f"{k:<{width}}  {v}")
    return 0


COMMANDS = [
    Command("generate", "sample text from any model, checkpoint, adapter or run", lambda: GenerateConfig,
            run_generate, positionals=("model", "prompt"),
            description="Sample continuations; each is followed by its token count and whether it ended with EOS or "
                        "hit --max-new-tokens. A prompt that looks like key=value is given as prompt=..."),
    Command("chat", "interactive terminal chat with any model (applies its chat template)", lambda: ChatConfig,
            run_chat, positionals=("model",),
            description="Chat in the terminal: /reset clears the history, /exit or Ctrl-D quits."),
    Command("info", "versions, devices and threads", lambda: InfoConfig, run_info),
]
