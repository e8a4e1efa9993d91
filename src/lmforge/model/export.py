"""Export any model source as a clean standalone HF directory (safetensors, tokenizer, generation config)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from lmforge import runs
from lmforge.errors import UserError
from lmforge.model.gguf_export import DTYPES, GGUFExportError, hf_dtype, write_gguf
from lmforge.model.load import hf_dir, is_reward_model, load_model, load_tokenizer, model_source_info, resolve
from lmforge.model.sharded import (LazyWeights, ShardedCheckpointError, ShardedWeights, is_sharded, tensor_index,
                                   write_model_dir)


def export_model(spec: str | Path, out_dir: str | Path, *, merge_lora: bool = False, dtype=None,
                 overwrite: bool = False, format: str = "hf") -> dict:
    """Write `spec` (alias, .gguf, HF dir, run, or adapter with merge_lora) to `out_dir`; returns a summary.

    An adapter is merged into its base with PEFT's merge_and_unload at the base's dtype; `dtype` then casts
    the result. The directory is written to a temp sibling and renamed, so `out_dir` is never half-written.
    format="gguf" writes one GGUF file for llama.cpp instead (model/gguf_export.py), `dtype` then f16, bf16,
    q8_0, q4_0 or f32.
    """
    import torch

    if format == "gguf":
        return _export_gguf(spec, out_dir, dtype=dtype, merge_lora=merge_lora, overwrite=overwrite)
    if format != "hf":
        raise UserError(f"unknown export format {format!r}: use hf (a model directory) or gguf (one llama.cpp file)")
    if Path(out_dir).suffix == ".gguf":
        raise UserError(f"--out {out_dir} names a .gguf file: pass --format gguf (format='gguf') to write GGUF")
    dtype = hf_dtype(dtype) if isinstance(dtype, str) else dtype
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    shards = sharded_checkpoint(spec)
    if shards is not None:
        cast = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        return _write_atomically(out, lambda tmp: export_sharded(shards, tmp, cast)) | {
            "out_dir": str(out), "source": {"spec": str(spec), "kind": "sharded", "path": str(shards), "base": None},
            "merged_lora": False}
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

    def write(tmp: Path) -> dict:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return {}

    _write_atomically(out, write)
    return {"out_dir": str(out), "source": model_source_info(spec), "merged_lora": r.kind == "adapter",
            "dtype": str(model.dtype).removeprefix("torch."),
            "params": sum(p.numel() for p in model.parameters())}


def _write_atomically(out: Path, write) -> dict:
    """Run `write(tmp)` on a temp sibling of `out` and rename it into place; returns what `write` returned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        info = write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def sharded_checkpoint(spec: str | Path) -> Path | None:
    """The checkpoint directory when `spec` (a run or a checkpoint) is a sharded one without HF weights, else None."""
    path = Path(str(spec)).expanduser()
    if runs.is_run(path):
        try:
            path = runs.latest_checkpoint(runs.checkpoints_dir(path)) or path
        except RuntimeError:
            return None
    if is_sharded(path) and not (path / "config.json").is_file():
        return path
    if (path / "deepspeed").is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} is an intermediate checkpoint of DeepSpeed's engine (ZeRO partitions, no HF weights): "
                        f"its run writes them at its end; for this step, DeepSpeed's own `python {path}/zero_to_fp32.py "
                        f"{path} OUT --tag deepspeed` gathers them (it unpickles the partitions in full), or resume the run")
    return None


def export_sharded(checkpoint: Path, out: Path, dtype=None) -> dict:
    """Write a pretraining run's sharded checkpoint as an HF model directory, streamed tensor by tensor.

    The model shape comes from the config stored in the checkpoint, the tokenizer and EOS id from its token
    shards' meta.json when they are still there. Fine-tuning and alignment checkpoints carry their base
    model's own files at the end of the run; their intermediate shards are resumed, not exported.
    """
    import torch

    from lmforge.model.build import hf_weights
    from lmforge.model.config import ModelConfig

    state = torch.load(Path(checkpoint) / "trainer_state.pt", map_location="cpu", weights_only=True)
    config = state.get("config") or {}
    if "model" not in config or "data" not in config:
        raise ShardedCheckpointError(f"{checkpoint} is a sharded fine-tuning or alignment checkpoint; export its "
                                     "run's final checkpoint (it has HF files), or resume the run to its end")
    cfg = ModelConfig(**config["model"])
    data = config["data"]
    source = Path(data["dir"]) if data.get("dir") else Path(next(iter(data.get("mix") or {}), ""))
    meta = json.loads((source / "meta.json").read_text()) if (source / "meta.json").is_file() else {}
    tokenizer = Path(meta["tokenizer"]) if meta.get("tokenizer") else None
    weights = hf_weights(cfg, ShardedWeights(checkpoint, "model"))
    if dtype is not None:
        weights = LazyWeights({k: (lambda k=k: weights[k].to(dtype)) for k in weights})
    write_model_dir(out, weights, cfg.hf_config_dict(meta.get("eos_id")), tokenizer, meta.get("eos_id"))
    model_tensors = [v for k, v in tensor_index(checkpoint).items() if k.startswith("model.")]
    return {"params": sum(shape.numel() for shape, _ in model_tensors),
            "dtype": str(dtype or model_tensors[0][1]).removeprefix("torch.")}


def _export_gguf(spec: str | Path, out: str | Path, *, dtype: str | None = None, merge_lora: bool = False,
                overwrite: bool = False) -> dict:
    """Write `spec` (any model source lmforge loads) as the GGUF file `out`; returns a summary.

    `dtype` is f32/f16/bf16/q8_0/q4_0 (or torch's float32/float16/bfloat16); None picks bf16 for a bf16 source,
    else f16, as llama.cpp's converter does. The file is written to a temp sibling and renamed into place.
    """
    out = Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}: use one of f16, bf16, q8_0, q4_0, f32 "
                              f"(or float16, bfloat16, float32)")
    if out.is_dir():
        raise GGUFExportError(f"--out {out} is a directory; a GGUF export is one file, e.g. {out / 'model.gguf'}")
    if out.exists() and not overwrite:
        raise GGUFExportError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    r = None if sharded_checkpoint(spec) is not None else resolve(spec)
    if r is not None and r.kind == "adapter" and not merge_lora:
        raise GGUFExportError(f"{spec} is a LoRA adapter: pass --merge-lora (merge_lora=True) to export base + "
                              f"adapter merged into one GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    if r is not None and r.kind in ("hf_dir", "gguf"):
        source = hf_dir(spec)
        info = write_gguf(source, out, dtype, name=Path(str(spec).rstrip("/")).name,
                          general_from=Path(r.path) if r.kind == "gguf" else None)
        return info | {"out": str(out), "source": model_source_info(spec), "merged_lora": False}
    staged = out.parent / f".tmp-{out.name}-hf-{os.getpid()}"
    try:
        staged_info = export_model(spec, staged, merge_lora=merge_lora, overwrite=True)
        info = write_gguf(staged, out, dtype, name=Path(str(spec).rstrip("/")).name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return info | {"out": str(out), "source": staged_info["source"], "merged_lora": staged_info["merged_lora"]}
