"""`lmforge align`: reward model, DPO, PPO and GRPO training."""
from __future__ import annotations

from lmforge.command import Command


def _config():
    from lmforge.align.config import AlignConfig
    return AlignConfig


def summary_text(s: dict, out_dir) -> str:
    """The lines an align run ends with: the training summary, then held-out numbers before and after."""
    from lmforge.train.commands import summary_text as train_summary

    lines = [train_summary(s, out_dir)]
    held = s.get("heldout") or []
    keys = [k for k in ("val_accuracy", "val_margin", "val_rewards/accuracies", "val_rewards/margins") if held and k in held[0]]
    for k in keys:
        first, last = held[0], held[-1]
        start = f"{first[k]:.4f} at step {first['step']} -> " if first["step"] != last["step"] else ""
        lines.append(f"held-out {k[4:]}: {start}{last[k]:.4f} at step {last['step']}")
    before, after = s.get("heldout_before") or {}, s.get("heldout_after") or {}
    for k, v in after.items():
        if isinstance(v, float) and k != "mean_length":
            b = before.get(k)
            lines.append(f"held-out {k}: {'?' if b is None else f'{b:.4f}'} before -> {v:.4f} after "
                         f"({after['n']} prompts, greedy)")
    return "\n".join(lines)


def run_align(cfg) -> int:
    from lmforge.align.run import align
    from lmforge.train.commands import run_stage

    return run_stage(align, cfg, summary_text)


COMMANDS = [
    Command("align", "reward model, DPO, PPO or GRPO on a base or fine-tuned model (full, LoRA, QLoRA)", _config,
            run_align,
            description="Align a model: algorithm=reward trains a scalar-head reward model on preference pairs "
                        "(loads with AutoModelForSequenceClassification), dpo trains the policy on pairs directly, ppo "
                        "maximises a reward model's (or function's) score with a KL penalty, grpo samples "
                        "num_generations completions per prompt and learns from verifiable rewards. Rollouts run on "
                        "the continuous-batching engine. Writes config.yaml, data_report.json, metrics.jsonl and "
                        "checkpoints (PEFT adapters for lora/qlora) to out_dir; ppo/grpo also eval_before.json and "
                        "eval_after.json. Re-running the same command resumes."),
]
