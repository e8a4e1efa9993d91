"""TRL side of bench/finetune_cpu.py: `SFTTrainer` + PEFT LoRA on Alpaca, as a TRL user would run it.

Run by finetune_cpu.py in its own process (under an RSS wrapper); not meant to be run by hand.
Writes OUT/metrics.jsonl (one line per optimizer step: step, loss, lr, grad_norm, tokens =
cumulative non-padding input tokens as counted by TRL from the attention mask, t = seconds since
train start, taken at `on_step_end`; cpu_s = process CPU seconds since train start, all threads;
padded_tokens = cumulative batch positions incl. padding as collated, which runs one batch ahead
because accelerate prefetches) and the final adapter in OUT/adapter (PEFT format).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sft_heldout import alpaca_prompt  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hf", required=True, help="base model HF directory")
    p.add_argument("--data", required=True, type=Path, help="Alpaca JSON array")
    p.add_argument("--n-train", required=True, type=int, help="train on the first N records")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--gradient-checkpointing", choices=["on", "off"], default="on")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(a.hf)
    records = json.loads(a.data.read_text())[: a.n_train]
    # Prompt/completion data: TRL appends EOS to the completion itself (only if it does not already end
    # with it), tokenizes prompt and prompt+completion, and with completion_only_loss (the default for
    # prompt/completion data) masks the prompt out of the loss.
    ds = Dataset.from_list([{"prompt": alpaca_prompt(r), "completion": r["output"]} for r in records])

    a.out.mkdir(parents=True, exist_ok=True)
    metrics = open(a.out / "metrics.jsonl", "w")

    class Timing(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.step_t = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.step_t[state.global_step] = (time.perf_counter() - self.t0, time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or state.global_step not in self.step_t:
                return
            rec = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "tokens": logs.get("num_tokens"),
                   "padded_tokens": padded[0], "t": self.step_t[state.global_step][0],
                   "cpu_s": self.step_t[state.global_step][1]}
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    cfg = SFTConfig(
        output_dir=str(a.out / "trainer"),
        use_cpu=True,
        bf16=a.precision == "bf16",
        gradient_checkpointing=a.gradient_checkpointing == "on",
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        warmup_steps=a.warmup,
        weight_decay=0.0,
        adam_beta1=a.beta1,
        adam_beta2=a.beta2,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        max_length=a.max_length,
        completion_only_loss=True,
        packing=False,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=a.seed,
        data_seed=a.seed,
    )
    peft_cfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                          target_modules=a.targets.split(","), task_type="CAUSAL_LM")
    t_setup = time.perf_counter()
    trainer = SFTTrainer(model=a.hf, args=cfg, train_dataset=ds, processing_class=tok,
                         peft_config=peft_cfg, callbacks=[Timing()])
    setup_s = time.perf_counter() - t_setup
    collate = trainer.data_collator
    padded = [0]  # cumulative batch positions incl. padding (input_ids.numel()), for the record

    def counting_collator(examples):
        batch = collate(examples)
        padded[0] += int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting_collator
    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    metrics.close()
    trainer.model.save_pretrained(str(a.out / "adapter"))
    # Sanity facts about what TRL actually trained on (EOS exactly once, completion-only labels).
    ex = trainer.train_dataset[0]
    ids, labels = ex["input_ids"], ex["labels"]
    info = {
        "setup_s": setup_s, "train_s": train_s, "precision": a.precision,
        "gradient_checkpointing": a.gradient_checkpointing == "on",
        "param_dtype": str(next(trainer.model.parameters()).dtype),
        "train_examples": len(trainer.train_dataset),
        "example0_eos_count": sum(1 for i in ids if i == tok.eos_token_id),
        "example0_ends_with_eos": ids[-1] == tok.eos_token_id,
        "example0_loss_tokens": sum(1 for x in labels if x != -100), "example0_tokens": len(ids),
    }
    (a.out / "info.json").write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
