"""Generate from a model while it trains: RL rollouts on the continuous-batching engine with the current weights.

The policy may be a PEFT model (LoRA, or QLoRA over 4-bit weights) under an optimizer. `LiveGenerator`
keeps one plain transformers copy of its architecture in the inference dtype; before each batch it
writes the policy's current weights into it (LoRA deltas added, 4-bit weights dequantised, nothing
changed in the policy itself), builds the engine's runner over it, and runs the requests in the
calling thread (`Engine.drain`), so the same weights and seeds give the same tokens every time.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from lmforge.infer.engine import Completion, Engine, SamplingParams, run_batch
from lmforge.infer.runner import check_supported


def _weight(layer: nn.Module) -> torch.Tensor:
    """A linear layer's weight as a plain tensor (a bitsandbytes 4-bit weight dequantised)."""
    w = layer.weight
    if w.__class__.__name__ in ("Params4bit", "Int8Params"):
        from peft.utils.integrations import dequantize_module_weight
        return dequantize_module_weight(layer)
    return w


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.no_grad()
def copy_weights(dst: nn.Module, src: nn.Module) -> None:
    """Write `src`'s effective weights (PEFT LoRA deltas merged, 4-bit dequantised) into the plain model `dst`."""
    modules = dict(_base(src).named_modules())
    for name, module in dst.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        s = modules[name]
        if hasattr(s, "get_base_layer") and hasattr(s, "get_delta_weight"):  # a PEFT LoRA layer
            base = s.get_base_layer()
            w = _weight(base).to(torch.float32)
            if not s.disable_adapters and not s.merged:
                for adapter in s.active_adapters:
                    if adapter in s.lora_A:
                        w = w + s.get_delta_weight(adapter).to(torch.float32)
            module.weight.copy_(w)
            if module.bias is not None:
                module.bias.copy_(base.bias)
            continue
        for pname, p in own.items():
            p.copy_(_weight(s) if pname == "weight" and hasattr(s, "weight") else getattr(s, pname))


class LiveGenerator:
    """Seeded batch generation from a training policy's current weights through the engine."""

    def __init__(self, policy: nn.Module, tokenizer, eos_ids: list[int], device: torch.device, dtype: torch.dtype,
                 max_batch: int = 64, max_model_len: int | None = None):
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(_base(policy).config)
        check_supported(config)
        if hasattr(config, "quantization_config"):  # the copy holds plain weights
            del config.quantization_config
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.policy, self.tok, self.eos_ids = policy, tokenizer, eos_ids
        self.max_batch = max_batch
        self.max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 2048

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        """Each prompt's `n` completions, prompt by prompt, from the policy's weights as they are now."""
        copy_weights(self.model, self.policy)
        longest = max(map(len, prompts))
        max_batch = max(self.max_batch, max(p.n for p in params))
        engine = Engine(self.model, self.tok, self.eos_ids, max_batch=max_batch, max_queue=1 << 30,
                        max_model_len=self.max_model_len, max_prefill_tokens=max(1024, longest))
        try:
            return run_batch(engine, list(zip(prompts, params)), drain=True)
        finally:
            engine.runner.release()
