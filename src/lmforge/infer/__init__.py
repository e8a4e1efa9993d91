"""The inference runtime: the one place a model is loaded and run for generation and scoring.

Public interface (import these names from `lmforge.infer`; the modules behind them are internal):
- `load_for_inference(spec, device, dtype)` -> `InferenceModel`: any model source, on lmforge.device's policy;
- `prompt_ids`, `chat_ids`, `eos_ids`: prompt rendering (none, chat template, Alpaca) and stop tokens;
- `Generator`: offline generation over any architecture (the engine, or transformers' generate);
- `Engine`, `Request`, `Event`, `SamplingParams`, `TokenLogprob`, `QueueFull`, `Completion`, `run_batch`:
  the continuous-batching engine that `lmforge serve` puts behind HTTP;
- `Runner`, `check_supported`: the fused Llama/Mistral/Qwen2 forward pass (scoring uses `hidden`/`logits`);
- `generate_samples`, `generate`, `chat`: `lmforge generate` and `lmforge chat`.
Names resolve lazily, so importing the package costs nothing until one is used.
"""
from __future__ import annotations

import importlib

_PUBLIC = {
    "load_for_inference": "load", "InferenceModel": "load",
    "prompt_ids": "prompts", "chat_ids": "prompts", "eos_ids": "prompts", "document_start": "prompts",
    "Generator": "generation", "Sample": "generation", "generate_samples": "generation", "generate": "generation",
    "chat": "generation", "sampling": "generation",
    "Engine": "engine", "Request": "engine", "Event": "engine", "SamplingParams": "engine",
    "TokenLogprob": "engine", "QueueFull": "engine", "Completion": "engine", "run_batch": "engine",
    "Runner": "runner", "check_supported": "runner",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'lmforge.infer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"lmforge.infer.{_PUBLIC[name]}"), name)
