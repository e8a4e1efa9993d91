"""Export any model source as a clean standalone HF directory (safetensors, tokenizer, generation config)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from lmforge.errors import UserError
from lmforge.model.load import is_reward_model, load_model, load_tokenizer, model_source_info, resolve


def export_model(spec: str | Path, out_dir: str | Path, *, merge_lora: bool = False, dtype=None,
                 overwrite: bool = False) -> dict:
    """Write `spec` (alias, .gguf, HF dir, run, or adapter with merge_lora) to `out_dir`; returns a summary.

    An adapter is merged into its base with PEFT's merge_and_unload at the base's dtype; `dtype` then casts
    the result. The directory is written to a temp sibling and renamed, so `out_dir` is never half-written.
    """
    import torch

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    r = resolve(spec)
    if r.kind == "adapter" and not merge_lora:
        raise UserError(f"{spec} is a LoRA adapter: pass --merge-lora (merge_lora=True) to export base + adapter "
                         f"as one model, or use the adapter directory as it is")
    model = load_model(spec, merge_adapter=True, head="score" if is_reward_model(spec) else "lm")
    if dtype is not None:
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    tok = load_tokenizer(spec)
    gen = getattr(model, "generation_config", None)  # None on a reward model (it does not generate)
    if gen is not None:
        if gen.eos_token_id is None:
            gen.eos_token_id = tok.eos_token_id
        gen.pad_token_id = tok.pad_token_id
    if hasattr(model.config, "quantization_config"):
        raise UserError(f"{spec} loads quantized; export needs full-precision weights")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out_dir": str(out), "source": model_source_info(spec), "merged_lora": r.kind == "adapter",
            "dtype": str(model.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters())}
