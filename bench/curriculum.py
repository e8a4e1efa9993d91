"""Curriculum vs random order at equal steps: a tiny char-level Llama pretrained on tinyshakespeare, windows in
random order (the default sampler), easy_to_hard, and competence (sqrt, c0 0.1, T = half the steps); difficulty
is each fixed window's perplexity under a reference model (the same tiny model pretrained briefly on the same data).

    python bench/curriculum.py [--work /tmp/curriculum_bench] [--steps 120] [--ref-steps 100] [--orders ...]
        [--chars N]
Prints one row per order: final val loss (the same 20 fixed val batches) and run seconds (scoring included).
Runs already finished in --work are reused (delete it to start over); --orders runs only those (e.g. one per
process on a busy machine), and the table shows the finished ones.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
COMMON = ["model.preset=tiny", "model.max_seq_len=64", "train.micro_batch_size=12", "train.lr=2e-3",
          "train.min_lr=2e-4", "train.warmup_steps=20", "train.eval_every=0", "train.eval_batches=20",
          "train.ckpt_every=0", "train.log_every=50", "train.device=cpu", "log.progress=false",
          "log.tensorboard=false", "seed=1"]


def pretrain_run(out: Path, shards: Path, steps: int, *extra: str) -> dict:
    """Pretrain (or read a finished run's numbers): final val loss and seconds."""
    from lmforge.config import load_config
    from lmforge.train.config import PretrainConfig
    from lmforge.train.pretrain import pretrain

    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(PretrainConfig, None, [f"data.dir={shards}", f"out_dir={out}", f"train.max_steps={steps}",
                                             *COMMON, *extra])
    t0 = time.perf_counter()
    summary = pretrain(cfg)
    result = {"val_loss": summary["last_val"][0], "seconds": time.perf_counter() - t0}
    done.write_text(json.dumps(result) + "\n")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/curriculum_bench"))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--ref-steps", type=int, default=100)
    ap.add_argument("--orders", nargs="+", default=["random", "easy_to_hard", "competence"])
    ap.add_argument("--chars", type=int, default=None, help="use only the first N characters of tinyshakespeare")
    args = ap.parse_args()
    from lmforge.tokens.shards import write_shards

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    shards = w / "shards"
    if not (shards / "meta.json").is_file():
        text = SHARED / "tinyshakespeare.txt"
        if args.chars:
            text = w / "input.txt"
            text.write_text((SHARED / "tinyshakespeare.txt").read_text()[:args.chars])
        write_shards(text, "char", shards)
    ref = pretrain_run(w / "reference", shards, args.ref_steps)
    ref_spec = f"curriculum.reference_model={w / 'reference'}"
    runs = {"random": ("random (no curriculum)", ()),
            "easy_to_hard": ("easy_to_hard", ("curriculum.order=easy_to_hard", ref_spec)),
            "competence": (f"competence (sqrt, c0 0.1, T {args.steps // 2})",
                           ("curriculum.order=competence", "curriculum.c0=0.1",
                            f"curriculum.competence_steps={args.steps // 2}", ref_spec))}
    for order in args.orders:
        pretrain_run(w / order, shards, args.steps, *runs[order][1])
    rows = [(name, pretrain_run(w / order, shards, args.steps, *extra)) for order, (name, extra) in runs.items()
            if (w / order / "summary.json").is_file()]
    print(f"reference: tiny Llama, {args.ref_steps} steps, val loss {ref['val_loss']:.4f}, {ref['seconds']:.0f} s")
    print(f"| order ({args.steps} steps, 12 x 64 chars per step) | final val loss | run s (incl. scoring) |")
    print("| --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['val_loss']:.4f} | {r['seconds']:.0f} |")
    (w / "report.json").write_text(json.dumps({"reference": ref, "rows": dict(rows), "args": vars(args)},
                                              indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
