"""Build a fresh model from a ModelConfig, with the hooks the engine needs to save it in HF format."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.sharded import LazyWeights


@dataclass
class BuiltModel:
    module: nn.Module
    blocks: list[nn.Module]  # transformer blocks: FSDP units
    export: Callable[[Mapping], Mapping]  # module state dict -> HF-named weights (lazy: converted when read)
    import_weights: Callable[[dict], dict]  # HF-named weights -> module state dict


def build_model(cfg: ModelConfig, seed: int) -> BuiltModel:
    """Initialise deterministically from `seed` (the same weights on every rank)."""
    torch.manual_seed(seed)
    if cfg.impl == "lean":
        from lmforge.model.llama import LeanLlama, hf_to_lean
        m = LeanLlama(cfg)
        return BuiltModel(m, list(m.blocks), lambda sd: hf_weights(cfg, sd), lambda sd: hf_to_lean(sd, cfg))
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM(cfg.to_hf_config(attn_implementation="sdpa"))

    def import_weights(sd):
        sd = dict(sd)
        if cfg.tie_embeddings:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        return sd

    return BuiltModel(m, list(m.model.layers), lambda sd: hf_weights(cfg, sd), import_weights)


def hf_weights(cfg: ModelConfig, sd: Mapping) -> Mapping:
    """A built model's state dict (possibly lazy) as the HF checkpoint's weights, converted as they are read."""
    if cfg.impl == "lean":
        from lmforge.model.llama import lean_to_hf
        return lean_to_hf(sd, cfg)
    return LazyWeights({k: (lambda k=k: sd[k]) for k in sd if not (cfg.tie_embeddings and k == "lm_head.weight")})


def logits_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits from either model kind (LeanLlama returns a tensor, transformers an output object)."""
    out = model(idx)
    return out if isinstance(out, torch.Tensor) else out.logits
