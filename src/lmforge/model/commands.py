"""`lmforge export`: any model source as a clean standalone HF directory."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from lmforge.command import Command
from lmforge.config import Strict

MODEL_HELP = ("HF model dir, .gguf file, smollm2-135m-instruct, a PEFT adapter dir, a hub id, or a run's out_dir "
              "(its latest checkpoint)")


class ExportConfig(Strict):
    model: str = Field(description=MODEL_HELP)
    out: Path = Field(description="output directory (must be empty or new); with --format gguf, the .gguf file")
    format: Literal["hf", "gguf"] = Field("hf", description="hf: a model directory; gguf: one file for llama.cpp")
    merge_lora: bool = Field(False, description="merge a LoRA adapter into its base model")
    dtype: Literal["float32", "bfloat16", "float16", "f32", "bf16", "f16", "q8_0", "q4_0"] | None = Field(
        None, description="weight type; f32/bf16/f16 are float32/bfloat16/float16 in either format; q8_0 and "
                          "q4_0 (llama.cpp block quantization) only with --format gguf. None: hf keeps the "
                          "source's dtype, gguf writes bf16 for a bf16 source, else f16")
    overwrite: bool = Field(False, description="replace a non-empty out directory (or an existing .gguf file)")


def run_export(cfg: ExportConfig) -> int:
    from lmforge.model.export import export_model

    info = export_model(cfg.model, cfg.out, merge_lora=cfg.merge_lora, dtype=cfg.dtype, overwrite=cfg.overwrite,
                        format=cfg.format)
    merged = " (LoRA merged into the base)" if info["merged_lora"] else ""
    source = info["source"]
    if cfg.format == "gguf":
        types = ", ".join(f"{n} {t}" for t, n in info["tensors"].items())
        print(f"exported {source['spec']} ({source['kind'].replace('_', ' ')}){merged} as GGUF {info['dtype']}: "
              f"{info['params'] / 1e6:.1f} M params, {sum(info['tensors'].values())} tensors ({types}), "
              f"{info['bytes'] / 1e6:.1f} MB -> {info['out']}")
        return 0
    print(f"exported {source['spec']} ({source['kind'].replace('_', ' ')}){merged}: {info['params'] / 1e6:.1f} M "
          f"params, {info['dtype']} -> {info['out_dir']}")
    return 0


def _merge_config():
    from lmforge.model.merge_config import MergeConfig

    return MergeConfig


def run_merge(cfg) -> int:
    from lmforge.model.merge import merge_models

    info = merge_models(cfg)
    base = f" onto {info['base']}" if info["base"] else ""
    files = f"{len(info['files'])} file{'s' if len(info['files']) > 1 else ''}"
    print(f"merged {len(info['models'])} models with {info['method']}{base}: {info['tensors']} tensors, "
          f"{info['params'] / 1e6:.1f} M params, {info['dtype']}, tokenizer of {info['tokenizer']} -> "
          f"{info['out_dir']} ({files}, {info['seconds']:.1f} s)")
    return 0


COMMANDS = [
    Command("export", "write a clean HF model directory from any model source or run", lambda: ExportConfig,
            run_export, positionals=("model",),
            description="Export MODEL as a standalone HF directory (model.safetensors, config.json, tokenizer with "
                        "chat template, generation_config.json). A LoRA run or adapter needs --merge-lora, which "
                        "merges the adapter into its base. --format gguf writes one GGUF file for llama.cpp "
                        "and Ollama instead (Llama architecture, byte-level BPE tokenizer and chat template "
                        "embedded), --dtype f16, bf16, q8_0 or q4_0."),
    Command("merge", "merge models from a mergekit YAML (linear, slerp, ties, dare, ...) into an HF directory",
            _merge_config, run_merge,
            description="Merge the models of a mergekit YAML (models, base_model, merge_method, parameters, dtype, "
                        "tokenizer_source) tensor by tensor into --out, a sharded HF directory with the tokenizer "
                        "of tokenizer_source."),
]
