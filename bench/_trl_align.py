"""TRL side of the alignment bench: `DPOTrainer`, `RewardTrainer` or `GRPOTrainer` + PEFT LoRA, as a TRL user
would run them (trl 1.16, CPU).

Run by the bench driver in its own process (under an RSS wrapper), like bench/_trl_sft.py:

    python bench/_trl_align.py --algo {dpo,reward,grpo} --hf HF_DIR --data FILE.jsonl --out OUT
        [--steps N] [--batch B] [--lr LR] [--max-length L] [--beta 0.1]
        [--lora-r 8 --lora-alpha 16 --lora-dropout 0.05 --targets q_proj,k_proj,v_proj,o_proj]
        [--precision fp32|bf16] [--num-generations G] [--max-completion-length M] [--seed S]
        [--disable-dropout auto|on|off] [--save-adapter]

Data (`--data`, JSONL) and how TRL sees it:

- dpo, reward: rows `prompt`, `chosen`, `rejected` (strings; `hh_pairs` makes them from Anthropic HH). TRL 1.16
  renders string ("standard") data as-is, without the chat template (it only appends EOS to chosen/rejected);
  it applies the chat template only to conversational data. So this script turns each row into a one-turn
  chat, CONVERSATIONAL format: prompt = [{"role": "user", "content": prompt}], chosen =
  [{"role": "assistant", "content": chosen}], rejected likewise (the strings unchanged, nothing stripped).
  DPO then tokenizes the prompt with `add_generation_prompt=True` and prompt+chosen / prompt+rejected
  without it (the SmolLM2 template adds its default system turn, and each answer ends `<|im_end|>\n`);
  RewardTrainer tokenizes the whole chats prompt+chosen / prompt+rejected.
- grpo: rows `prompt` (string) and `answer` (GSM8K answer text ending `#### N`; `gsm8k_prompts` makes them).
  Also CONVERSATIONAL: prompt = [{"role": "user", "content": prompt}], so TRL applies the chat template with
  the generation prompt; completions come back as [{"role": "assistant", "content": text}].

Truncation differs by trainer (TRL's choice, kept): DPO truncates each prompt+answer sequence to
`--max-length` (keep_start) and drops pairs whose prompt alone fills it; RewardTrainer DROPS pairs whose
chosen or rejected chat exceeds `--max-length` (summary.json gives the examples left); GRPOConfig 1.16 has no
prompt-length limit (`max_prompt_length` is gone), so `--max-length` is unused for grpo.

Dropout: TRL's `disable_dropout` (default True for DPO and reward, False for GRPO) sets every nn.Dropout to
p=0 after the PEFT wrap, LoRA dropout included; `--disable-dropout auto` keeps TRL's default, and
summary.json records the LoRA dropout in effect.

Writes OUT/metrics.jsonl, one line per optimizer step: step, loss, lr, grad_norm, t (seconds since train
start, at `on_step_end`), cpu_s (process CPU seconds since train start, all threads), tokens (cumulative
non-padding tokens of the training forward passes, TRL's own cumulative `num_tokens`: dpo = prompt+chosen
and prompt+rejected rows after truncation, reference passes not counted; reward = both chats; grpo =
prompt + completion tokens of each generation batch), and per algorithm:
  dpo: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected
  reward: accuracy, margin, mean_reward
  grpo: reward, reward_std, completions/mean_length, completions/clipped_ratio, frac_reward_zero_std, the
        per-function reward means, entropy, and gen_tokens = cumulative generated (completion) tokens,
        completions/mean_length * completions per step (per_device_train_batch_size: one generation batch
        per optimizer step, as steps_per_generation = gradient_accumulation_steps = 1).
and OUT/summary.json (setup_s, train_s, steps, final_loss, the settings, param dtype, train examples left
after TRL's filtering, example0 = the first training example's token ids decoded; grpo: its rendered prompt). The
adapter is saved (OUT/adapter, `trainer.save_model`) only with --save-adapter; no checkpoints otherwise.

`hh_pairs(path, n)` and `gsm8k_prompts(path, n)` build the data rows; `gsm8k_correct_reward` and
`gsm8k_format_reward` are the GRPO reward functions (importable by the driver).
"""
from __future__ import annotations

import argparse
import gzip
import json
from itertools import islice
import re
import sys
import time
from pathlib import Path

ASSISTANT_TAG = "\n\nAssistant:"
GSM8K_INSTRUCTION = "\nSolve the problem step by step. On the last line, write the final answer as '#### <number>'."
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FORMAT = re.compile(r"####\s*(-?\d[\d,]*(?:\.\d+)?)\s*$")


# ---------------------------------------------------------------- data helpers
def _open_text(path):
    path = Path(path)
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def hh_split(chosen: str, rejected: str) -> dict | None:
    """Anthropic HH pair -> {prompt, chosen, rejected}: the prompt is the longest common prefix of the two
    dialogues cut after its last "\\n\\nAssistant:"; each response is the rest. None if no such prefix or a
    response is empty."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind(ASSISTANT_TAG, 0, n)  # the last tag lying wholly inside the common prefix
    if cut < 0:
        return None
    end = cut + len(ASSISTANT_TAG)
    row = {"prompt": chosen[:end], "chosen": chosen[end:], "rejected": rejected[end:]}
    if not row["chosen"].strip() or not row["rejected"].strip() or row["chosen"] == row["rejected"]:
        return None
    return row


def _jsonl(path):
    """The JSON records of a JSONL(.gz) file, blank lines skipped, read lazily."""
    with _open_text(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def hh_pairs(path, n: int | None = None) -> list[dict]:
    """The first n usable pairs of an HH-RLHF JSONL(.gz) file (rows `chosen`, `rejected` full dialogues) as
    {prompt, chosen, rejected} strings, TRL's standard preference format (see hh_split)."""
    rows = (hh_split(r["chosen"], r["rejected"]) for r in _jsonl(path))
    return list(islice((row for row in rows if row is not None), n))


def gsm8k_prompts(path, n: int | None = None, instruction: str = GSM8K_INSTRUCTION) -> list[dict]:
    """The first n GSM8K rows (`question`, `answer`) as {prompt: question + instruction, answer}."""
    rows = ({"prompt": r["question"].strip() + instruction, "answer": r["answer"]} for r in _jsonl(path))
    return list(islice(rows, n))


# ---------------------------------------------------------------- GSM8K rewards
def _num(s: str) -> float | None:
    s = s.replace(",", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        return None


def gsm8k_target(answer: str) -> float | None:
    """The number after the last '####' of a GSM8K answer."""
    if "####" not in answer:
        return None
    m = _NUMBER.search(answer.rsplit("####", 1)[1])
    return _num(m.group(0)) if m else None


def _text(completion) -> str:
    """A completion as text: a string, or a conversational completion (list of messages)."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if isinstance(m, dict))


def gsm8k_correct(text: str, answer: str) -> float:
    """1.0 if the last number in `text` equals the number after '####' in `answer`, else 0.0."""
    nums = _NUMBER.findall(text)
    target = gsm8k_target(answer)
    if not nums or target is None:
        return 0.0
    got = _num(nums[-1])
    return 1.0 if got is not None and abs(got - target) < 1e-6 else 0.0


def gsm8k_format(text: str) -> float:
    """1.0 if `text` ends with '#### <number>' (trailing whitespace allowed), else 0.0."""
    return 1.0 if _FORMAT.search(text) else 0.0


def gsm8k_correct_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """GRPOTrainer reward function (dataset column `answer` arrives as a keyword)."""
    return [gsm8k_correct(_text(c), a) for c, a in zip(completions, answer)]


def gsm8k_format_reward(prompts, completions, **kwargs) -> list[float]:
    """GRPOTrainer reward function."""
    return [gsm8k_format(_text(c)) for c in completions]


# ---------------------------------------------------------------- CLI
ALGO_KEYS = {
    "dpo": ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected"],
    "reward": ["accuracy", "margin", "mean_reward"],
    "grpo": ["reward", "reward_std", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std",
             "rewards/gsm8k_correct_reward/mean", "rewards/gsm8k_format_reward/mean", "entropy"],
}


def _read_jsonl(path: Path) -> list[dict]:
    with _open_text(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--algo", required=True, choices=["dpo", "reward", "grpo"])
    p.add_argument("--hf", required=True, help="base model HF directory")
    p.add_argument("--data", required=True, type=Path, help="JSONL: prompt/chosen/rejected (dpo, reward) or "
                                                            "prompt/answer (grpo)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="per_device_train_batch_size (grpo: completions per step)")
    p.add_argument("--lr", type=float, default=None, help="default: 5e-6 dpo, 1e-4 reward, 1e-5 grpo")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=128)
    p.add_argument("--disable-dropout", choices=["auto", "on", "off"], default="auto",
                   help="TRL's disable_dropout (auto: TRL's default: on for dpo/reward, off for grpo)")
    p.add_argument("--save-adapter", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.lr is None:
        a.lr = {"dpo": 5e-6, "reward": 1e-4, "grpo": 1e-5}[a.algo]

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(a.hf)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    rows = _read_jsonl(a.data)
    if a.algo in ("dpo", "reward"):
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    else:
        ds = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                for r in rows])

    a.out.mkdir(parents=True, exist_ok=True)
    metrics = open(a.out / "metrics.jsonl", "w")
    keys = ALGO_KEYS[a.algo]
    gen_tokens = [0.0]
    last = {}

    class Timing(TrainerCallback):
        def __init__(self):
            self.t0 = self.c0 = None
            self.step_t = {}

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.step_t[state.global_step] = (time.perf_counter() - self.t0, time.process_time() - self.c0)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = logs or {}
            if "loss" not in logs or state.global_step not in self.step_t:
                return
            t, cpu = self.step_t[state.global_step]
            rec = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "tokens": logs.get("num_tokens"), "t": t, "cpu_s": cpu}
            for k in keys:
                if k in logs:
                    rec[k] = logs[k]
            if a.algo == "grpo" and logs.get("completions/mean_length") is not None:
                gen_tokens[0] += logs["completions/mean_length"] * args.per_device_train_batch_size
                rec["gen_tokens"] = round(gen_tokens[0])
            last.update(rec)
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    common = dict(
        output_dir=str(a.out / "trainer"),
        use_cpu=True,
        bf16=a.precision == "bf16",
        gradient_checkpointing=False,
        per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=1,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=a.seed,
        data_seed=a.seed,
    )
    if a.disable_dropout != "auto":
        common["disable_dropout"] = a.disable_dropout == "on"
    lora = dict(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                target_modules=a.targets.split(","))
    t_setup = time.perf_counter()
    if a.algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        cfg = DPOConfig(**common, beta=a.beta, loss_type="sigmoid", max_length=a.max_length)
        trainer = DPOTrainer(model=a.hf, args=cfg, train_dataset=ds, processing_class=tok,
                             peft_config=LoraConfig(**lora, task_type="CAUSAL_LM"), callbacks=[Timing()])
    elif a.algo == "reward":
        from trl import RewardConfig, RewardTrainer

        # TRL builds AutoModelForSequenceClassification(num_labels=1) from the path (a new, seeded `score`
        # head); PEFT's SEQ_CLS task puts `score` in modules_to_save, so the head is trained in full.
        cfg = RewardConfig(**common, max_length=a.max_length)
        trainer = RewardTrainer(model=a.hf, args=cfg, train_dataset=ds, processing_class=tok,
                                peft_config=LoraConfig(**lora, task_type="SEQ_CLS"), callbacks=[Timing()])
    else:
        from trl import GRPOConfig, GRPOTrainer

        cfg = GRPOConfig(**common, num_generations=a.num_generations, max_completion_length=a.max_completion_length,
                         temperature=1.0, beta=0.0, loss_type="grpo", use_vllm=False)
        trainer = GRPOTrainer(model=a.hf, reward_funcs=[gsm8k_correct_reward, gsm8k_format_reward], args=cfg,
                              train_dataset=ds, processing_class=tok,
                              peft_config=LoraConfig(**lora, task_type="CAUSAL_LM"), callbacks=[Timing()])
    setup_s = time.perf_counter() - t_setup

    t_train = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t_train
    metrics.close()
    if a.save_adapter:
        trainer.save_model(str(a.out / "adapter"))

    import torch

    lora_p = [m.p for n, m in trainer.model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    summary = {
        "algo": a.algo, "format": "conversational", "setup_s": setup_s, "train_s": train_s,
        "steps": last.get("step"), "final_loss": last.get("loss"), "tokens": last.get("tokens"),
        "gen_tokens": last.get("gen_tokens"), "precision": a.precision,
        "param_dtype": str(next(trainer.model.parameters()).dtype),
        "train_examples": len(trainer.train_dataset), "data_rows": len(rows),
        "lora_dropout_in_effect": max(lora_p) if lora_p else None,
        "disable_dropout": cfg.disable_dropout, "batch": a.batch, "lr": a.lr, "max_length": a.max_length,
        "beta": a.beta if a.algo == "dpo" else None,
        "num_generations": a.num_generations if a.algo == "grpo" else None,
        "max_completion_length": a.max_completion_length if a.algo == "grpo" else None,
        "trainable_params": sum(x.numel() for x in trainer.model.parameters() if x.requires_grad),
    }
    ex = trainer.train_dataset[0]  # what TRL trained on, decoded: the two sides can be checked to see the same text
    summary["example0"] = {k: tok.decode(ex[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k in ex}
    if a.algo == "grpo":  # prompts are tokenized per step by GRPOTrainer: the chat template's rendering
        summary["example0"] = {"prompt": tok.apply_chat_template(ex["prompt"], tokenize=False,
                                                                 add_generation_prompt=True)}
    (a.out / "summary.json").write_text(json.dumps(summary, indent=1))
    try:
        (a.out / "trainer").rmdir()  # output_dir, empty: nothing is saved there
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
