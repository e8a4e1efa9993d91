"""Model shape: named presets or explicit dimensions, resolved into one LlamaConfig-compatible spec."""
from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from lmforge.config import Strict

# Llama-architecture shapes. The small ones tie embeddings (as GPT-2/nanoGPT do); 1b follows
# TinyLlama-1.1B; 7b/13b/70b follow Llama-2. `tiny` is for tests: it builds and steps in milliseconds.
PRESETS: dict[str, dict] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=176,
                 max_seq_len=128, tie_embeddings=True),
    "124m": dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=12, intermediate_size=2048,
                 max_seq_len=2048, tie_embeddings=True),
    "350m": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=16, intermediate_size=2816,
                 max_seq_len=2048, tie_embeddings=True),
    "1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632,
               max_seq_len=2048, tie_embeddings=False),
    "7b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32, intermediate_size=11008,
               max_seq_len=4096, tie_embeddings=False),
    "13b": dict(hidden_size=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_size=13824,
                max_seq_len=4096, tie_embeddings=False),
    "70b": dict(hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_size=28672,
                max_seq_len=4096, tie_embeddings=False),
}


class ModelConfig(Strict):
    """`preset` fills every dimension; any dimension given explicitly wins over the preset."""

    preset: Literal["tiny", "124m", "350m", "1b", "7b", "13b", "70b"] | None = "tiny"
    vocab_size: int | None = None  # None: taken from the token shards' meta.json
    hidden_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    intermediate_size: int | None = None
    max_seq_len: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool | None = None
    init_std: float = 0.02
    # lean: our fused Llama module (faster, same weights/HF format); hf: transformers' LlamaForCausalLM.
    impl: Literal["lean", "hf"] = "lean"

    @model_validator(mode="after")
    def _fill_from_preset(self):
        base = PRESETS[self.preset] if self.preset else {}
        for key, value in base.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        missing = [k for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len")
                   if getattr(self, k) is None]
        if missing:
            raise ValueError(f"set model.preset or give {', '.join(missing)}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.tie_embeddings is None:
            object.__setattr__(self, "tie_embeddings", True)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head dimension (hidden_size / num_heads) must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def hf_config_dict(self, eos_id: int | None = None) -> dict:
        """The checkpoint's config.json: a transformers LlamaConfig, written without importing transformers."""
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers, "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads, "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tie_embeddings, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "initializer_range": self.init_std,
            "bos_token_id": None, "eos_token_id": eos_id, "pad_token_id": None, "torch_dtype": "float32",
        }

    def to_hf_config(self, **extra):
        """The same config as a transformers LlamaConfig object (to build LlamaForCausalLM)."""
        from transformers import LlamaConfig

        return LlamaConfig(**{k: v for k, v in self.hf_config_dict().items() if k != "model_type"}, **extra)


def n_params(cfg: ModelConfig, include_embeddings: bool = False) -> int:
    """Parameter count from the shape alone (used by MFU and the planner without building the model)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    attn = d * (cfg.num_heads * hd) * 2 + d * (cfg.num_kv_heads * hd) * 2
    mlp = 3 * d * cfg.intermediate_size
    body = cfg.num_layers * (attn + mlp + 2 * d) + d
    emb = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return body + (emb if include_embeddings else 0)


def flops_per_token(n_params_no_emb: int, num_layers: int, hidden: int, seq_len: int, vocab_size: int) -> float:
    """Training FLOPs per token: 6N for the body and the output head, plus attention 12·L·h·s (PaLM appendix B).

    Here, with the shapes, so MFU logging (train/) and cost planning (plan/, which must not import torch) share it.
    """
    return 6 * (n_params_no_emb + vocab_size * hidden) + 12 * num_layers * hidden * seq_len
