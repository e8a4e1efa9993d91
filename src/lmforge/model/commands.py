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
    out: Path = Field(description="output directory (must be empty or new)")
    merge_lora: bool = Field(False, description="merge a LoRA adapter into its base model")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="cast the weights (None: keep "
                                                                                      "the source's dtype)")
    overwrite: bool = Field(False, description="replace a non-empty out directory")


def run_export(cfg: ExportConfig) -> int:
    from lmforge.model.export import export_model

    info = export_model(cfg.model, cfg.out, merge_lora=cfg.merge_lora, dtype=cfg.dtype, overwrite=cfg.overwrite)
    merged = " (LoRA merged into the base)" if info["merged_lora"] else ""
    source = info["source"]
    print(f"exported {source['spec']} ({source['kind'].replace('_', ' ')}){merged}: {info['params'] / 1e6:.1f} M "
          f"params, {info['dtype']} -> {info['out_dir']}")
    return 0


COMMANDS = [
    Command("export", "write a clean HF model directory from any model source or run", lambda: ExportConfig,
            run_export, positionals=("model",),
            description="Export MODEL as a standalone HF directory (model.safetensors, config.json, tokenizer with "
                        "chat template, generation_config.json). A LoRA run or adapter needs --merge-lora, which "
                        "merges the adapter into its base."),
]
