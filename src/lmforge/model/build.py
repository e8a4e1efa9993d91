"""Build a fresh model from a ModelConfig, with the hooks the engine needs to save it in HF format."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lmforge.model.config import ModelConfig


@dataclass
class BuiltModel:
    module: nn.Module
    blocks: list[nn.Module]  # transformer blocks: FSDP units
    export: Callable[[dict], dict]  # module state dict -> HF-named weights
    import_weights: Callable[[dict], dict]  # HF-named weights -> module state dict


def build_model(cfg: ModelConfig, seed: int) -> BuiltModel:
    """Initialise deterministically from `seed` (the same weights on every rank)."""
    torch.manual_seed(seed)
    if cfg.impl == "lean":
        from lmforge.model.llama import LeanLlama, hf_to_lean, lean_to_hf
        m = LeanLlama(cfg)
        return BuiltModel(m, list(m.blocks), lambda sd: lean_to_hf(sd, cfg), lambda sd: hf_to_lean(sd, cfg))
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM(cfg.to_hf_config(attn_implementation="sdpa"))

    def export(sd):
        return {k: v for k, v in sd.items() if not (cfg.tie_embeddings and k == "lm_head.weight")}

    def import_weights(sd):
        sd = dict(sd)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    return BuiltModel(m, list(m.model.layers), export, import_weights)


def logits_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits from either model kind (LeanLlama returns a tensor, transformers an output object)."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits
