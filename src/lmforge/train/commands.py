"""`lmforge pretrain` and `lmforge finetune`: the training engine's commands."""
from __future__ import annotations

import sys
from pathlib import Path

from lmforge.command import Command


def _pretrain_config():
    from lmforge.train.config import PretrainConfig
    return PretrainConfig


def _finetune_config():
    from lmforge.train.config import FinetuneConfig
    return FinetuneConfig


def run_stage(stage, cfg, text=None) -> int:
    """Run a training stage and print its summary (rank 0) with `text(summary, out_dir)`; a guard stop exits 1."""
    from lmforge.train.guards import TrainingStopped

    try:
        summary = stage(cfg)
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 1
    if summary.get("rank", 0) == 0:
        print((text or summary_text)(summary, cfg.out_dir))
    return 0


def run_pretrain(cfg) -> int:
    from lmforge.train.pretrain import pretrain
    return run_stage(pretrain, cfg)


def run_finetune(cfg) -> int:
    from lmforge.train.finetune import finetune
    return run_stage(finetune, cfg)


def summary_text(s: dict, out_dir: Path) -> str:
    """The lines a training run ends with: steps, val loss before and after, memory, where things are."""
    first, last = s.get("first_val"), s.get("last_val")
    if "n_params" in s:
        lines = [f"steps {s['steps']} in {s['elapsed_s']:.1f} s ({s['precision']}, {s['n_params'] / 1e6:.2f} M params)"]
    else:
        lines = [f"steps {s['steps']} in {s['elapsed_s']:.1f} s ({s['precision']}, {s['method']}, "
                 f"{s['trainable_params'] / 1e6:.2f} M of {s['total_params'] / 1e6:.1f} M params trained)"]
    if first:
        lines.append(f"val loss {first[0]:.4f} (ppl {first[1]:.2f}) at the start")
    if last:
        lines.append(f"val loss {last[0]:.4f} (ppl {last[1]:.2f}) at the end")
    if s.get("peak_rss_gb"):
        model_mem = f", model {s['model_memory_gb'] * 1024:,.1f} MB" if s.get("model_memory_gb") else ""
        lines.append(f"memory: peak RSS {s['peak_rss_gb']:.2f} GB{model_mem}")
    lines.append(f"metrics: {Path(out_dir) / 'metrics.jsonl'}")
    if s.get("final_checkpoint"):
        lines.append(f"checkpoint: {s['final_checkpoint']}")
    return "\n".join(lines)


COMMANDS = [
    Command("pretrain", "pretrain a Llama-architecture model on token shards", _pretrain_config, run_pretrain,
            description="Pretrain from token shards. Re-running the same command resumes from "
                        "out_dir/checkpoints/latest. Multi-process: torchrun --nproc_per_node N -m lmforge pretrain "
                        "... train.parallel=ddp|fsdp. Writes config.yaml, metrics.jsonl and checkpoints/ to out_dir."),
    Command("finetune", "full, LoRA or QLoRA supervised fine-tuning of any causal LM", _finetune_config, run_finetune,
            description="Fine-tune a base model (HF dir, hub id, .gguf, lmforge run, or smollm2-135m-instruct) on "
                        "instruction, chat or text data. Prints the data report, trainable parameters and a summary; "
                        "writes config.yaml, metrics.jsonl, data_report.json and checkpoints (PEFT adapters for "
                        "lora/qlora) to out_dir. Re-running the same command resumes."),
]
