"""LoRA alignment on SmolLM2-135M-Instruct: `lmforge align` (dpo, reward, grpo) vs TRL's DPOTrainer, RewardTrainer and
GRPOTrainer + PEFT, the same job on each side, one side at a time.

    python bench/align_cpu.py [--algos dpo,reward,grpo] [--precision fp32|bf16] [--steps 12] [--batch 4]
        [--grpo-steps 4] [--grpo-batch 8] [--num-generations 4] [--max-completion-length 64]
        [--max-length 256] [--keep DIR] [--json FILE] [--skip-trl | --skip-lmforge] [lmforge key=value ...]

Both sides load the base from the same HF directory (`lmforge.model.load.hf_dir('smollm2-135m-instruct')`,
converted once in this parent process before any side runs; lmforge gets that directory as `base_model`). Each
side runs in its own subprocess under the RSS wrapper of bench/finetune_cpu.py (`run_side`: the larger of
getrusage's ru_maxrss and the polled process-tree RSS; waits for the machine to go idle before each side; the
sides never overlap). lmforge runs as a user would: `python -m lmforge align configs/align/smollm2-<algo>-*.yaml
key=value...`; TRL through bench/_trl_align.py.

The same job on both sides:

- data: one JSONL per algorithm, written by this script, read by both sides.
  - dpo, reward: `prompt`/`chosen`/`rejected` strings from `hh_pairs` (Anthropic HH harmless test split), keeping
    the first steps x batch pairs whose longer chat (prompt + answer, rendered with the chat template as TRL
    renders it, see below) fits --max-length tokens, so neither side truncates or drops a pair (TRL's DPO
    truncates at max_length, its RewardTrainer drops longer pairs, lmforge truncates: all are no-ops here). The
    file holds exactly steps x batch pairs and lmforge holds none out (`data.val_size=0`): each side trains one
    epoch over the same pairs, each in its own shuffled order.
  - grpo: steps x batch / num_generations GSM8K train problems from `gsm8k_prompts`, written as `question`
    (= the question + GSM8K_INSTRUCTION, the text TRL's side puts in its user message) and `answer`; again one
    epoch of the same prompts on each side (lmforge `data.val_size=0`, `grpo.eval_prompts=0`, so no held-out
    greedy scoring before or after).
- rendering: TRL's side converts each row to a one-turn CONVERSATIONAL chat; lmforge renders string pairs and
  `question` prompts as a one-turn chat with the same tokenizer chat template (align/data.py `Renderer`). SmolLM2's
  template adds its default system turn ("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
  when a chat has none, on both sides, so the lmforge config's `data.system_prompt` is overridden to null
  (setting one would REPLACE that default turn and make the prompts differ). The prompts are token-identical
  (checked by this script against TRL's summary.json example0 on the first training pair/prompt: `render check`
  in the output). One known difference: each answer on TRL's side ends `<|im_end|>\\n` (the template's text
  after the turn, kept by TRL's DPO and RewardTrainer), on lmforge's `<|im_end|>` (Renderer strips the trailing
  newline), so TRL trains and counts one more token per answer (~0.5-1 % of the tokens here).
- LoRA r 8, alpha 16, dropout 0, q/k/v/o_proj on both (TRL `--disable-dropout on` too, which also zeroes the
  model's own dropout: SmolLM2 has none). Reward: the new one-output `score` head trained in full on both sides
  (TRL via PEFT SEQ_CLS modules_to_save).
- optimizer: AdamW lr (--lr-dpo/--lr-reward/--lr-grpo, default 5e-5 / 1e-4 / 1e-4, the lmforge configs' values),
  betas 0.9/0.999, eps 1e-8, weight decay 0, constant schedule, no warmup, grad clip 1.0 (TRL's defaults where
  not set); batch --batch pairs (dpo, reward) or --grpo-batch completions (grpo) per step, no accumulation.
- dpo: sigmoid loss, beta 0.1, reference = the base with the adapter off, computed every step (no precompute) on
  both sides. reward: Bradley-Terry loss, no centering term (`reward.center_rewards=null`, TRL's default None).
- grpo: num_generations G, max_completion_length M, temperature 1.0, top_p 1, top_k off, beta 0 (no reference),
  loss_type grpo, epsilon 0.2 both ways, num_iterations 1, scale_rewards group; the same two reward functions,
  imported by lmforge from bench/_trl_align.py (`gsm8k_correct_reward`, `gsm8k_format_reward`) rather than its
  built-ins, so the rewards are the very same functions. TRL generates with transformers' `generate` on the
  training model (no vLLM on CPU); lmforge with its continuous-batching engine over a weight copy, fp32 on CPU.
- precision: fp32 on both by default (--precision bf16: lmforge `train.precision=bf16`, TRL `bf16=True`).
- lmforge: `train.eval_every=0 train.log_every=1 train.ckpt_every=0 log.progress=false`; it still writes one
  final checkpoint (the adapter) after the last step, outside the timed steps. TRL saves nothing.

Measured (the first optimizer step is warm-up and excluded from every rate, as in finetune_cpu.py):

- tokens/s (dpo, reward): each side's own count of non-padding tokens of the training forward passes
  (dpo: prompt+chosen and prompt+rejected, reference passes not counted; reward: both chats), from step 1 to the
  last step, over the step timestamps (lmforge metrics `elapsed_s`, TRL `t`); pairs/s as well (the same pairs on
  both sides, so this one does not depend on how tokens are counted);
- peak RSS (GB) of the whole side process (load, data, training, lmforge's final adapter save);
- grpo: wall seconds per step (steps 2..N: rollout + reward + update) and generated (completion) tokens/s
  = completion tokens of steps 2..N over the same wall time (lmforge: `gen_tokens` of each step's line; TRL:
  its cumulative `gen_tokens`, = completions/mean_length x batch). lmforge also logs the rollout's own time
  (`gen_s`): its generation-only rate is shown for reference; TRL logs no generation time;
- final numbers side by side: dpo/reward loss at the last step and the mean over the last 4 steps (with
  rewards/accuracies or accuracy), grpo mean reward over all steps and at the last step, last loss. Each side
  sees the pairs/prompts in its own order and samples its own completions, so these agree only roughly.

Targets (issue): dpo >= 1.5x TRL's tokens/s and <= 0.8x its peak RSS; reward >= 1.5x tokens/s; grpo >= 3x (per-step
wall time, i.e. TRL's s/step over lmforge's, and generated tokens/s).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from _trl_align import gsm8k_prompts, hh_pairs  # noqa: E402
from finetune_cpu import ROOT, run_side, summarize  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CONFIGS = {"dpo": ROOT / "configs/align/smollm2-dpo-hh.yaml", "reward": ROOT / "configs/align/smollm2-reward-hh.yaml",
           "grpo": ROOT / "configs/align/smollm2-grpo-gsm8k.yaml"}
TARGETS = {"dpo": {"tokens_per_sec": 1.5, "peak_rss": 0.8}, "reward": {"tokens_per_sec": 1.5},
           "grpo": {"s_per_step": 3.0, "gen_tokens_per_sec": 3.0}}
LAST = 4  # steps averaged for the "last steps" loss


# ---------------------------------------------------------------- data
def chat_len(tok, prompt: str, answer: str | None) -> int:
    """Tokens of the one-turn chat as TRL's conversational path renders it (answer None: the prompt with the
    generation prompt)."""
    msgs = [{"role": "user", "content": prompt}]
    if answer is None:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer}], tokenize=False)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def write_pairs(path: Path, src: Path, n: int, tok, max_length: int) -> dict:
    rows, seen = [], 0
    for r in hh_pairs(src, None):
        seen += 1
        if max(chat_len(tok, r["prompt"], r["chosen"]), chat_len(tok, r["prompt"], r["rejected"])) <= max_length:
            rows.append(r)
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"only {len(rows)} HH pairs of {src} fit max_length {max_length}; need {n}")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return {"pairs": n, "scanned": seen}


def write_prompts(lm_path: Path, trl_path: Path, src: Path, n: int) -> None:
    rows = gsm8k_prompts(src, n)
    if len(rows) < n:
        raise SystemExit(f"{src} has only {len(rows)} problems; need {n}")
    with open(trl_path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with open(lm_path, "w") as f:  # lmforge's prompt records: `question` already carries the instruction
        for r in rows:
            f.write(json.dumps({"question": r["prompt"], "answer": r["answer"]}) + "\n")


# ---------------------------------------------------------------- sides
def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_lmforge(a, algo: str, hf: Path, data: Path, work: Path) -> dict:
    out = work / f"lmforge-{algo}"
    steps, batch = (a.grpo_steps, a.grpo_batch) if algo == "grpo" else (a.steps, a.batch)
    lr = {"dpo": a.lr_dpo, "reward": a.lr_reward, "grpo": a.lr_grpo}[algo]
    cmd = [sys.executable, "-m", "lmforge", "align", str(CONFIGS[algo]), f"base_model={hf}", f"out_dir={out}",
           f"data.path={data}", "data.val_size=0", "method=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0",
           "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", f"train.max_steps={steps}",
           f"train.micro_batch_size={batch}", "train.grad_accum=1", f"train.lr={lr}", "train.schedule=constant",
           "train.warmup_steps=0", "train.weight_decay=0", "train.beta1=0.9", "train.beta2=0.999", "train.eps=1e-8",
           "train.grad_clip=1.0", f"train.precision={a.precision}", "train.eval_every=0", "train.log_every=1",
           "train.ckpt_every=0", f"seed={a.seed}", "resume=never", "log.progress=false", "log.tensorboard=false"]
    if algo in ("dpo", "reward"):
        cmd += [f"data.max_length={a.max_length}", f"data.max_prompt_length={a.max_length}"]
    if algo == "dpo":
        cmd += ["dpo.beta=0.1", "dpo.loss_type=sigmoid", "dpo.label_smoothing=0", "dpo.precompute_ref=false"]
    elif algo == "reward":
        cmd += ["reward.center_rewards=null", "data.template=auto"]
    else:
        fns = f"[{BENCH / '_trl_align.py'}:gsm8k_correct_reward,{BENCH / '_trl_align.py'}:gsm8k_format_reward]"
        cmd += ["data.system_prompt=null", "data.max_prompt_length=512", f"grpo.num_generations={a.num_generations}",
                f"grpo.max_completion_length={a.max_completion_length}", "grpo.temperature=1.0", "grpo.top_p=1.0",
                "grpo.top_k=0", "grpo.loss_type=grpo", "grpo.beta=0", "grpo.epsilon=0.2", "grpo.epsilon_high=0.2",
                "grpo.num_iterations=1", "grpo.scale_rewards=group", "grpo.eval_prompts=0", f"grpo.rewards={fns}"]
    cmd += a.overrides  # extra lmforge key=value settings from the command line, applied last
    proc = run_side(f"lmforge-{algo}", cmd, work, a.wait_idle)
    recs = read_jsonl(out / "metrics.jsonl")
    steps_ = sorted((r for r in recs if "loss" in r and "elapsed_s" in r and "val_loss" not in r),
                    key=lambda r: r["step"])
    m = re.search(r"trainable params: ([\d,]+)", (work / f"lmforge-{algo}.log").read_text(errors="replace"))
    res = {"side": "lmforge", "cmd": cmd, "steps_log": steps_, **proc,
           "trainable_params": int(m.group(1).replace(",", "")) if m else None,
           "data_report": json.loads((out / "data_report.json").read_text())}
    if algo == "grpo":
        cum = 0
        for r in steps_:  # per-step rollout tokens -> cumulative, like TRL's
            cum += r.get("gen_tokens", 0)
            r["gen_tokens_cum"] = cum
        res.update(grpo_rates(steps_, "elapsed_s", "gen_tokens_cum"))
        gen = [r for r in steps_[1:] if r.get("gen_s")]
        if gen:
            res["gen_only_tokens_per_sec"] = sum(r["gen_tokens"] for r in gen) / sum(r["gen_s"] for r in gen)
            res["gen_s_share"] = sum(r["gen_s"] for r in gen) / (steps_[-1]["elapsed_s"] - steps_[0]["elapsed_s"])
    else:
        res.update(summarize(steps_, "elapsed_s", "cpu_s" if steps_ and "cpu_s" in steps_[0] else None))
    return res


def run_trl(a, algo: str, hf: Path, data: Path, work: Path) -> dict:
    out = work / f"trl-{algo}"
    steps, batch = (a.grpo_steps, a.grpo_batch) if algo == "grpo" else (a.steps, a.batch)
    lr = {"dpo": a.lr_dpo, "reward": a.lr_reward, "grpo": a.lr_grpo}[algo]
    cmd = [sys.executable, str(BENCH / "_trl_align.py"), "--algo", algo, "--hf", str(hf), "--data", str(data),
           "--out", str(out), "--steps", str(steps), "--batch", str(batch), "--lr", str(lr),
           "--max-length", str(a.max_length), "--beta", "0.1", "--lora-r", "8", "--lora-alpha", "16",
           "--lora-dropout", "0", "--targets", "q_proj,k_proj,v_proj,o_proj", "--precision", a.precision,
           "--num-generations", str(a.num_generations), "--max-completion-length", str(a.max_completion_length),
           "--disable-dropout", "on", "--seed", str(a.seed)]
    proc = run_side(f"trl-{algo}", cmd, work, a.wait_idle)
    steps_ = sorted(read_jsonl(out / "metrics.jsonl"), key=lambda r: r["step"])
    res = {"side": "TRL", "cmd": cmd, "steps_log": steps_, **proc,
           "trl_summary": json.loads((out / "summary.json").read_text())}
    if algo == "grpo":
        res.update(grpo_rates(steps_, "t", "gen_tokens"))
        res["tokens_per_cpu_s"] = None
    else:
        res.update(summarize(steps_, "t", "cpu_s"))
    return res


def grpo_rates(steps: list[dict], time_key: str, gen_key: str) -> dict:
    """Per-step wall time and generated tokens/s over steps 2..N (step 1 excluded); all tokens/s too."""
    if len(steps) < 2 or steps[0]["step"] != 1:
        raise RuntimeError("need every step logged from step 1, at least 2 steps")
    first, last = steps[0], steps[-1]
    dt = last[time_key] - first[time_key]
    step_s = [b[time_key] - a_[time_key] for a_, b in zip(steps, steps[1:])]
    return {"steps": last["step"], "train_s": dt, "s_per_step": dt / (len(steps) - 1), "step_s": step_s,
            "step1_s": first[time_key], "gen_tokens": last[gen_key] - first[gen_key],
            "gen_tokens_per_sec": (last[gen_key] - first[gen_key]) / dt,
            "tokens_per_sec": (last["tokens"] - first["tokens"]) / dt if last.get("tokens") is not None else None}


# ---------------------------------------------------------------- checks and report
def render_check(algo: str, tok, trl: dict, data: Path) -> str:
    """Compare TRL's first training row as it decoded it (summary.json example0; TRL keeps the file's order and drops
    nothing here) with lmforge's Renderer on the same row."""
    from lmforge.align.data import Renderer, preference_texts, prompt_text

    ex = trl["trl_summary"].get("example0") or {}
    r = Renderer(tok, "auto", None)  # the bench's lmforge runs: template auto, no system prompt
    row = read_jsonl(data)[0]
    if algo == "grpo":
        ids = r.prompt(prompt_text({"question": row["prompt"]}, True))
        return f"prompt {'identical' if tok.decode(ids) == ex.get('prompt') else 'DIFFERS'} ({len(ids)} tokens)"
    p, c, j = preference_texts(row, True)
    lm_p = tok.decode(r.prompt(p))
    lm = {"chosen": tok.decode(r.answer(p, c)), "rejected": tok.decode(r.answer(p, j))}
    notes = []
    if algo == "dpo":  # DPO's example0: prompt_ids, chosen_ids, rejected_ids (answers without the prompt)
        notes.append("prompt " + ("identical" if ex.get("prompt_ids") == lm_p else "DIFFERS"))
    else:  # RewardTrainer's: chosen_ids, rejected_ids (whole chats)
        lm = {k: lm_p + v for k, v in lm.items()}
    for k, text in lm.items():
        t = ex.get(f"{k}_ids", "")
        notes.append(f"{k} " + ("identical" if t == text else f"identical but TRL adds {t[len(text):]!r}"
                                if t.startswith(text) else "DIFFERS"))
    return ", ".join(notes)


def final_numbers(algo: str, steps: list[dict]) -> dict:
    last = steps[-1]
    tail = steps[-LAST:]
    out = {"loss_last": last["loss"], "loss_last4": statistics.fmean(r["loss"] for r in tail)}
    key = {"dpo": "rewards/accuracies", "reward": "accuracy"}.get(algo)
    if key:
        vals = [r[key] for r in tail if r.get(key) is not None]
        out["acc_last4"] = statistics.fmean(vals) if vals else None
        mk = {"dpo": "rewards/margins", "reward": "margin"}[algo]
        vals = [r[mk] for r in tail if r.get(mk) is not None]
        out["margin_last4"] = statistics.fmean(vals) if vals else None
    else:
        vals = [r["reward"] for r in steps if r.get("reward") is not None]
        out["reward_mean"] = statistics.fmean(vals) if vals else None
        out["reward_last"] = last.get("reward")
        ml = [r["completions/mean_length"] for r in steps if r.get("completions/mean_length") is not None]
        out["mean_completion_len"] = statistics.fmean(ml) if ml else None
    return out


def fmt(v, f=".2f"):
    return "-" if v is None else format(v, f)


def table(algo: str, lm: dict | None, trl: dict | None) -> list[str]:
    """Markdown rows: lmforge, TRL, and the ratio (lmforge's gain: higher is better for lmforge), with the target."""
    targets = TARGETS[algo]
    lines = ["| | lmforge | TRL | lmforge vs TRL |", "|---|---|---|---|"]

    def row(name, get, f, better="higher", target=None):
        v = [None if s is None else get(s) for s in (lm, trl)]
        ratio = ""
        if v[0] and v[1] and better is not None:
            if better == "higher":  # lmforge / TRL
                x, cmp = v[0] / v[1], ">="
            else:  # lower is better: TRL / lmforge for time (speed-up), lmforge / TRL for memory
                x, cmp = (v[1] / v[0], ">=") if better == "time" else (v[0] / v[1], "<=")
            ratio = f"{x:.2f}x"
            if target is not None:
                ok = x >= target if cmp == ">=" else x <= target
                ratio += f" (target {cmp} {target}x: **{'met' if ok else 'MISSED'}**)"
        lines.append(f"| {name} | {fmt(v[0], f)} | {fmt(v[1], f)} | {ratio} |")

    fin = lambda k: (lambda s: s["final"].get(k))  # noqa: E731
    if algo == "grpo":
        row("s/step, steps 2..N (ratio: TRL s / lmforge s)", lambda s: s["s_per_step"], ".1f", "time",
            targets["s_per_step"])
        row("generated tokens/s, steps 2..N", lambda s: s["gen_tokens_per_sec"], ".1f", "higher",
            targets["gen_tokens_per_sec"])
        row("generated tokens, steps 2..N", lambda s: s["gen_tokens"], ".0f", None)
        row("prompt+completion tokens/s, steps 2..N", lambda s: s["tokens_per_sec"], ".1f")
        row("step 1 s (excluded)", lambda s: s["step1_s"], ".1f", "time")
        row("peak RSS GB (ratio: lmforge / TRL)", lambda s: s["peak_rss_gb"], ".2f", "memory")
        row("mean completion length, all steps", fin("mean_completion_len"), ".1f", None)
        row("reward (correct + format), mean of all steps", fin("reward_mean"), ".3f", None)
        row("reward, last step", fin("reward_last"), ".3f", None)
        row("loss, last step", fin("loss_last"), ".4g", None)
    else:
        row("tokens/s, steps 2..N", lambda s: s["tokens_per_sec"], ".1f", "higher", targets["tokens_per_sec"])
        row("pairs/s, steps 2..N", lambda s: (s["steps"] - 1) * s["batch"] / s["train_s"], ".3f")
        row("peak RSS GB (ratio: lmforge / TRL)", lambda s: s["peak_rss_gb"], ".2f", "memory", targets.get("peak_rss"))
        row("tokens counted, steps 2..N", lambda s: s["tokens"], ".0f", None)
        row("loss, last step", fin("loss_last"), ".4f", None)
        row(f"loss, mean of last {LAST} steps", fin("loss_last4"), ".4f", None)
        acc, margin = ("rewards/accuracies", "rewards/margins") if algo == "dpo" else ("accuracy", "margin")
        row(f"{acc}, mean of last {LAST} steps", fin("acc_last4"), ".3f", None)
        row(f"{margin}, mean of last {LAST} steps", fin("margin_last4"), ".3f", None)
    row("side process wall s (start-up, load, train, save)", lambda s: s["wall_s"], ".0f", "time")
    row("other work on the machine meanwhile (cores)", lambda s: s["others_cores"], ".2f", None)
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", default="dpo,reward,grpo")
    p.add_argument("--hh", type=Path, default=DATA / "hh_rlhf_harmless_test.jsonl.gz")
    p.add_argument("--gsm8k", type=Path, default=DATA / "gsm8k_train.jsonl")
    p.add_argument("--base-model", default="smollm2-135m-instruct", help="resolved to an HF dir with hf_dir()")
    p.add_argument("--steps", type=int, default=12, help="dpo and reward optimizer steps")
    p.add_argument("--batch", type=int, default=4, help="dpo and reward pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="pairs whose chats exceed it are not used")
    p.add_argument("--lr-dpo", type=float, default=5e-5)
    p.add_argument("--lr-reward", type=float, default=1e-4)
    p.add_argument("--lr-grpo", type=float, default=1e-4)
    p.add_argument("--grpo-steps", type=int, default=4)
    p.add_argument("--grpo-batch", type=int, default=8, help="completions per step (batch / G prompts)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", choices=["lmforge-first", "trl-first"], default="lmforge-first")
    p.add_argument("--wait-idle", type=float, default=600,
                   help="before each side, wait up to this many seconds for other work on the machine to finish")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-lmforge", action="store_true")
    p.add_argument("--keep", type=Path, help="keep the work files (data, logs, metrics) in this directory")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("overrides", nargs="*", help="lmforge key=value settings for every lmforge side "
                                                "(e.g. data.packing=false)")
    a = p.parse_args()
    algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    if bad := [x for x in algos if x not in CONFIGS]:
        p.error(f"unknown --algos {bad}")
    if a.grpo_batch % a.num_generations:
        p.error("--num-generations must divide --grpo-batch")

    from transformers import AutoTokenizer

    from lmforge.model.load import hf_dir

    hf = Path(hf_dir(a.base_model))
    tok = AutoTokenizer.from_pretrained(hf)
    print(f"base: {a.base_model} -> {hf}", file=sys.stderr)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-alignbench-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for algo in algos:
            if algo == "grpo":
                n = a.grpo_steps * a.grpo_batch // a.num_generations
                lm_data, trl_data = work / "gsm8k_lmforge.jsonl", work / "gsm8k_trl.jsonl"
                write_prompts(lm_data, trl_data, a.gsm8k, n)
                info = {"prompts": n}
            else:
                lm_data = trl_data = work / f"pairs_{algo}.jsonl"
                info = write_pairs(lm_data, a.hh, a.steps * a.batch, tok, a.max_length)
            sides = [s for s in ("lmforge", "TRL") if not (s == "TRL" and a.skip_trl)
                     and not (s == "lmforge" and a.skip_lmforge)]
            if a.order == "trl-first":
                sides.reverse()
            res = {"data": info}
            for s in sides:
                try:
                    r = (run_lmforge(a, algo, hf, lm_data, work) if s == "lmforge"
                         else run_trl(a, algo, hf, trl_data, work))
                except RuntimeError as e:
                    print(f"[{algo}] {s} FAILED: {e}", file=sys.stderr)
                    res[s] = None
                    res[f"{s}_error"] = str(e)
                    continue
                r["batch"] = a.grpo_batch if algo == "grpo" else a.batch
                r["final"] = final_numbers(algo, r["steps_log"])
                res[s] = r
                rate = r.get("gen_tokens_per_sec") if algo == "grpo" else r.get("tokens_per_sec")
                print(f"[{time.strftime('%H:%M:%S')}] {algo} {s}: {fmt(rate, '.1f')} "
                      f"{'gen ' if algo == 'grpo' else ''}tok/s, {r['peak_rss_gb']:.2f} GB, "
                      f"process {r['wall_s']:.0f} s", file=sys.stderr, flush=True)
            if res.get("TRL") is not None:
                try:
                    res["render_check"] = render_check(algo, tok, res["TRL"], trl_data)
                except Exception as e:  # noqa: BLE001 - a report line, not a failure
                    res["render_check"] = f"check failed: {e!r}"
            results[algo] = res

    import subprocess
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    import torch
    import transformers
    import trl
    print(f"machine: {os.cpu_count()} cores; lmforge {commit}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}; precision {a.precision}; base dir {hf}; "
          "first step excluded from rates")
    for algo, res in results.items():
        lm, trl = res.get("lmforge"), res.get("TRL")
        if algo == "grpo":
            print(f"\n{algo}: {a.grpo_steps} steps x {a.grpo_batch} completions ({a.grpo_batch // a.num_generations} "
                  f"prompts x G {a.num_generations}), max completion {a.max_completion_length}, lr {a.lr_grpo}")
        else:
            print(f"\n{algo}: {a.steps} steps x {a.batch} pairs, max_length {a.max_length}, "
                  f"lr {a.lr_dpo if algo == 'dpo' else a.lr_reward}; data {res['data']}")
        print("\n".join([f"### {algo}", ""] + table(algo, lm, trl)))
        if lm is not None and algo == "grpo" and lm.get("gen_only_tokens_per_sec"):
            print(f"lmforge rollout only: {lm['gen_only_tokens_per_sec']:.1f} generated tokens/s "
                  f"(rollouts {lm['gen_s_share'] * 100:.0f} % of steps 2..N)")
        for side in (lm, trl):
            if side is not None and algo == "grpo":
                print(f"{side['side']} per-step s: {[round(x, 1) for x in side['step_s']]}")
        if lm is not None and algo == "reward" and lm["final"].get("acc_last4") is None:
            print("note: lmforge's reward train lines carry no accuracy/margin/mean_reward (before commit 34a3843 its "
                  "reward objective logged them as eval metrics)")
        if trl is not None:
            s = trl["trl_summary"]
            print(f"TRL: train examples after its filtering {s.get('train_examples')} of {s.get('data_rows')}, "
                  f"LoRA dropout modules {s.get('lora_dropout_in_effect') or 'none (p=0: Identity)'}, "
                  f"trainable params {s.get('trainable_params')}")
        if lm is not None:
            d = lm["data_report"]
            print(f"lmforge: {d['n_train']} train / {d['n_val']} held out, {d['truncated']} truncated, "
                  f"skipped {d['skipped'] or 'none'}, trainable params {lm.get('trainable_params')}")
        if res.get("render_check"):
            print(f"render check: {res['render_check']}")
        for s in ("lmforge", "TRL"):
            if res.get(f"{s}_error"):
                print(f"{s} FAILED: {res[f'{s}_error']}")
    noisy = [f"{algo} {s}" for algo, res in results.items() for s in ("lmforge", "TRL")
             if res.get(s) is not None and res[s]["others_cores"] > 0.1]
    if noisy:
        print(f"\nwarning: other work used > 0.1 cores while {', '.join(noisy)} ran: those timings are suspect "
              "(torch's threads stall whenever a core is taken); rerun on a quiet machine")
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                                      "hf_dir": str(hf), "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
