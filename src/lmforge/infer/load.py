"""A model ready for inference from any source the loader accepts, on the device and dtype policy of lmforge.device.

Adapters are merged into their base, the model is in eval mode, and its stop tokens are known, so
every command that runs a model (generate, chat, serve, eval, eval human) starts from the same object.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.device import inference_dtype, pick_device
from lmforge.infer.prompts import eos_ids
from lmforge.infer.runner import check_supported
from lmforge.model.load import load_model, load_tokenizer


@dataclass
class InferenceModel:
    """A loaded causal LM and its tokenizer, with where and how it runs."""
    spec: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    eos_ids: list[int]

    @classmethod
    def of(cls, model, tokenizer, spec: str = "") -> InferenceModel:
        """Wrap a model and tokenizer loaded elsewhere (tests, callers that already hold one)."""
        p = next(model.parameters())
        return cls(spec, model.eval(), tokenizer, p.device, p.dtype, eos_ids(model, tokenizer))

    @property
    def max_positions(self) -> int:
        """The model's context window in tokens (2,048 when its config does not say)."""
        return getattr(self.model.config, "max_position_embeddings", None) or 2048

    @property
    def runner_supported(self) -> bool:
        """Whether the fused runner and the engine cover this architecture (else transformers' generate runs it)."""
        try:
            check_supported(self.model.config)
        except ValueError:
            return False
        return True

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_for_inference(spec: str | Path, device: str = "auto", dtype: str = "auto",
                       device_key: str = "device") -> InferenceModel:
    """Load `spec` (alias, .gguf, HF dir, run, adapter, hub id) for inference.

    `device_key` is the setting a missing device is reported under."""
    dev = pick_device(device, key=device_key)
    dt = inference_dtype(dev, dtype)
    tok = load_tokenizer(spec)
    model = load_model(spec, dtype=dt, device=dev, merge_adapter=True).eval()
    return InferenceModel(str(spec), model, tok, dev, dt, eos_ids(model, tok))
