"""nanoGPT's CPU recipe (shakespeare_char, 4L/4H/128, ctx 64, batch 12, 2,000 steps) with lmforge.

Runs `lmforge tokenize` + `lmforge pretrain configs/pretrain/shakespeare-char-cpu.yaml` as a user
would, times the whole pretrain process, and prints lmforge against nanoGPT: wall time for the
2,000 steps, time until val loss first reaches the target (1.88), final val loss, tokens/s,
and the val-loss curve. nanoGPT's figures are the ones measured on this machine class
(DESIGN.md: 75.6 s wall, ~32 ms per train step, val loss 1.886, 2026-11-26) unless
`--nanogpt-wall/--nanogpt-step-ms/--nanogpt-loss` give fresh ones.

    python bench/pretrain_cpu.py [--runs 3] [--data ../shared/data/tinyshakespeare.txt]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
CONFIG = ROOT / "configs" / "pretrain" / "shakespeare-char-cpu.yaml"
TARGET = 1.88


def lmforge(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lmforge", *args], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def one_run(shards: Path, out: Path, extra: list[str]) -> dict:
    t0 = time.perf_counter()
    lmforge("pretrain", str(CONFIG), f"data.dir={shards}", f"out_dir={out}", "log.progress=false", *extra)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    train = [r for r in records if "tokens_per_sec" in r]
    loop_s = train[-1]["elapsed_s"]
    overhead = wall - loop_s  # interpreter + imports + final eval/checkpoint
    hit = next((r for r in evals if r["val_loss"] <= TARGET), None)
    return {
        "wall_s": wall,
        "steps": train[-1]["step"],
        "final_val": evals[-1]["val_loss"],
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in train[len(train) // 10:]),
        "target_step": hit["step"] if hit else None,
        "target_wall_s": hit["elapsed_s"] + overhead if hit else None,
        "curve": [(r["step"], round(r["val_loss"], 4)) for r in evals],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians (the machine is noisy)")
    p.add_argument("--nanogpt-wall", type=float, default=75.6, help="nanoGPT's wall seconds for 2,000 steps")
    p.add_argument("--nanogpt-loss", type=float, default=1.886, help="nanoGPT's val loss at step 2,000")
    p.add_argument("--nanogpt-step-ms", type=float, default=32.0, help="nanoGPT's train step time (ms), evals excluded")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for the lmforge run")
    args = p.parse_args()
    if not args.data.is_file():
        print(f"error: {args.data} not found (pass --data tinyshakespeare.txt)", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        tmp = Path(tmp)
        lmforge("tokenize", str(args.data), "--tokenizer", "char", "--out", str(tmp / "shards"), "--val-fraction", "0.1")
        runs = [one_run(tmp / "shards", tmp / f"run{i}", args.overrides) for i in range(args.runs)]

    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    hits = [r["target_wall_s"] for r in runs if r["target_wall_s"] is not None]
    target_wall = statistics.median(hits) if len(hits) == len(runs) else None
    nano_tps = 12 * 64 / (args.nanogpt_step_ms / 1000)
    print(f"machine: {os.cpu_count()} cores; runs: {args.runs}; overrides: {' '.join(args.overrides) or '-'}")
    print("| | nanoGPT (recorded) | lmforge (median) | ratio |")
    print("|---|---|---|---|")
    print(f"| wall, 2,000 steps (s) | {args.nanogpt_wall:.1f} | {med('wall_s'):.1f} | "
          f"{args.nanogpt_wall / med('wall_s'):.2f}x |")
    tw = f"{target_wall:.1f}" if target_wall else "not reached"
    ratio = f"{args.nanogpt_wall / target_wall:.2f}x" if target_wall else "-"
    print(f"| wall to val loss <= {TARGET} (s) | {args.nanogpt_wall:.1f} (1.886 at step 2,000) | {tw} | {ratio} |")
    print(f"| val loss at step 2,000 | {args.nanogpt_loss:.3f} | {med('final_val'):.3f} | |")
    print(f"| train tokens/s (evals excluded) | {nano_tps:,.0f} | {med('tokens_per_sec'):,.0f} | "
          f"{med('tokens_per_sec') / nano_tps:.2f}x |")
    for i, r in enumerate(runs):
        print(f"run {i}: wall {r['wall_s']:.1f} s, target at step {r['target_step']} "
              f"({r['target_wall_s'] and round(r['target_wall_s'], 1)} s), val curve {r['curve']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
