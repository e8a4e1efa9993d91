"""Continual learning with EWC on SmolLM2-135M-Instruct: task A (Alpaca), then task B (GSM8K solutions) with and
without EWC; prints task-A and task-B held-out loss after each stage.

Full fine-tuning (or LoRA, --method lora) through `lmforge.train.finetune.finetune` (the CLI's code path). Task A's held-out set is the
val split of the Alpaca data (data.val_size, keyed by the seed), task B's that of the GSM8K data; the EWC run's
Fisher comes from the train split of the same Alpaca spec, so A's held-out examples stay unseen. Held-out loss is
the token-weighted mean SFT loss (response tokens + EOS) in fp32.

    python bench/continual_ewc.py [--work /tmp/continual_ewc] [--lam 1e6 ...] [--steps-a 10] [--steps-b 15]
        [--only a|plain|ewc|eval]
--steps-a 0 takes SmolLM2-135M-Instruct itself as the task-A model (it was instruction-tuned already), for a
machine too busy to fine-tune it first. Runs and held-out losses already in --work are reused (delete it to
start over); --only does one part (run the parts in parallel processes on a busy machine, then once without it).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMON = ["train.device=cpu", "train.micro_batch_size=2", "train.grad_accum=1", "train.warmup_steps=2",
          "train.schedule=constant", "train.eval_every=0", "train.ckpt_every=0", "train.log_every=5",
          "log.progress=false", "log.tensorboard=false", "data.max_length=160", "data.val_size=12"]


def gsm8k_as_alpaca(dst: Path, n: int) -> Path:
    """The first n GSM8K problems as Alpaca records (instruction = question, output = the worked solution)."""
    rows = [json.loads(line) for line in (SHARED / "gsm8k_train.jsonl").read_text().splitlines()[:n]]
    dst.write_text("".join(json.dumps({"instruction": r["question"], "input": "", "output": r["answer"]}) + "\n"
                           for r in rows))
    return dst


def _seconds(out: Path) -> float | None:
    """A finished run's training seconds (its last train line's elapsed_s)."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return max((r["elapsed_s"] for r in lines if "loss" in r), default=None)


def run(out: Path, base: str, data: Path, steps: int, lr: float, *extra: str) -> None:
    """Fine-tune, unless the run has finished already."""
    from lmforge.config import load_config
    from lmforge.train.config import FinetuneConfig
    from lmforge.train.finetune import finetune

    if (out / "checkpoints" / "latest").is_file():
        return
    cfg = load_config(FinetuneConfig, None, [f"base_model={base}", f"data.path={data}", f"out_dir={out}",
                                             f"train.max_steps={steps}", f"train.lr={lr}", "data.max_examples=1200",
                                             *COMMON, *extra])
    finetune(cfg)


def heldout_losses(model_spec: str, datasets: list[Path], cache: Path) -> list[float]:
    """Token-weighted mean SFT loss of the model on the val split of each data set (as the runs split it), fp32;
    read from `cache` when there, else written to it."""
    import torch

    from lmforge.model.load import load_model, load_tokenizer
    from lmforge.train.finetune import sft_loss
    from lmforge.train.sft_data import SFTDataConfig, eval_batches, load_sft_data

    if cache.is_file():
        return json.loads(cache.read_text())
    tok = load_tokenizer(model_spec)
    model = load_model(model_spec, dtype=torch.float32).eval()
    out = []
    for data in datasets:
        split = load_sft_data(SFTDataConfig(path=str(data), max_length=160, val_size=12, max_examples=1200), tok, 1337)
        total = count = 0
        with torch.no_grad():
            for batch in eval_batches(split, 4, 0, 1):
                loss, n = sft_loss(model, batch)
                total, count = total + float(loss) * n, count + n
        out.append(total / count)
    cache.write_text(json.dumps(out) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/continual_ewc"))
    ap.add_argument("--lam", type=float, nargs="+", default=[1e6], help="ewc.lambda (one EWC run each)")
    ap.add_argument("--steps-a", type=int, default=10)
    ap.add_argument("--steps-b", type=int, default=15)
    ap.add_argument("--fisher-batches", type=int, default=4)
    ap.add_argument("--only", choices=["a", "plain", "ewc", "eval"])
    ap.add_argument("--method", choices=["full", "lora"], default="full", help="lora: all-linear r 8 adapters")
    ap.add_argument("--lr-b", type=float, default=1e-4, help="task B's learning rate")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    alpaca, gsm = SHARED / "alpaca_5000.json", gsm8k_as_alpaca(w / "gsm8k_alpaca.jsonl", 1200)

    base = "smollm2-135m-instruct"
    method = [f"method={args.method}"] + (["lora.target_modules=all-linear"] if args.method == "lora" else [])
    a_model = str(w / "A") if args.steps_a else base
    if args.only in (None, "a") and args.steps_a:
        run(w / "A", base, alpaca, args.steps_a, 2e-5, *method)
    if args.only in (None, "plain"):
        run(w / "B_plain", a_model, gsm, args.steps_b, args.lr_b, *method)
    for lam in args.lam if args.only in (None, "ewc") else []:
        run(w / f"B_ewc_{lam:g}", a_model, gsm, args.steps_b, args.lr_b, *method, f"ewc.lambda={lam}",
            f"ewc.fisher_data.path={alpaca}", "ewc.fisher_data.max_examples=1200", "ewc.fisher_data.max_length=160",
            "ewc.fisher_data.val_size=12", f"ewc.fisher_batches={args.fisher_batches}")
    if args.only == "eval":
        heldout_losses(a_model, [alpaca, gsm], w / "heldout_A.json")
    if args.only is not None:
        return
    rows = [("after A (before B)" if args.steps_a else "SmolLM2-135M-Instruct (task-A model, before B)", a_model, "A"),
            ("after B, plain", str(w / "B_plain"), "B_plain")]
    rows += [(f"after B, EWC lambda={lam:g}", str(w / f"B_ewc_{lam:g}"), f"B_ewc_{lam:g}") for lam in args.lam]
    secs = {key: _seconds(w / key) for _, _, key in rows}
    result = []
    for name, spec, key in rows:
        a_loss, b_loss = heldout_losses(spec, [alpaca, gsm], w / f"heldout_{key}.json")
        result.append({"stage": name, "task_a_loss": a_loss, "task_b_loss": b_loss, "train_s": secs.get(key)})
    penalties = {lam: [json.loads(line)["ewc_penalty"] for line in
                       (w / f"B_ewc_{lam:g}" / "metrics.jsonl").read_text().splitlines() if '"ewc_penalty"' in line]
                 for lam in args.lam}
    print("| stage | task A (Alpaca) held-out loss | task B (GSM8K) held-out loss | train s (elapsed_s) |")
    print("| --- | --- | --- | --- |")
    for r in result:
        t = "" if r["train_s"] is None else f"{r['train_s']:.0f}"
        print(f"| {r['stage']} | {r['task_a_loss']:.4f} | {r['task_b_loss']:.4f} | {t} |")
    a0, a_plain, b_plain = result[0]["task_a_loss"], result[1]["task_a_loss"], result[1]["task_b_loss"]
    for lam, r in zip(args.lam, result[2:]):
        print(f"lambda {lam:g}: task-A forgetting (loss rise over 'after A') plain {a_plain - a0:+.4f}, EWC "
              f"{r['task_a_loss'] - a0:+.4f}; task-B cost of EWC {r['task_b_loss'] - b_plain:+.4f}; "
              f"ewc_penalty in train lines {penalties[lam]}")
    (w / "report.json").write_text(json.dumps({"rows": result, "ewc_penalty": penalties, "args": vars(args)},
                                              indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
