"""LoRA SFT of SmolLM2-135M-Instruct on Alpaca: lmforge finetune vs TRL SFTTrainer + PEFT, same job, same run.

Both sides train the same LoRA (r 8, alpha 16, dropout 0.05, q/k/v/o_proj) on the same first
N-200 records of the Alpaca file (standard Alpaca prompt, loss on response + EOS only, max
length 512), batch 4 examples, no accumulation, AdamW lr 2e-4 (betas 0.9/0.999, eps 1e-8: TRL's
defaults), weight decay 0, 5 warmup steps then cosine to 0, grad clip 1.0, the same number of
steps, each in its own shuffled order:

- lmforge: `python -m lmforge finetune CONFIG base_model=... data.path=TRAIN.jsonl ...` as a user
  would run it, in a subprocess, with its own precision default (train.precision=auto) and any
  extra key=value overrides given on this command line;
- TRL: `SFTTrainer` + PEFT `LoraConfig` on a prompt/completion dataset (bench/_trl_sft.py), in a
  subprocess. Default rows (--trl-configs): `bf16` = TRL 1.16's own CPU defaults (`bf16=True`,
  i.e. CPU autocast, and `gradient_checkpointing=True`; SFTConfig refuses to start on a CPU-only
  machine with its default bf16 unless `use_cpu=True`, which the bench sets), its smallest-memory
  row; `bf16-nogc` = bf16 without gradient checkpointing, TRL's fastest row on this CPU (the
  configuration of the ~108 tokens/s / 4.2 GB figure in DESIGN.md). `fp32` and `fp32-nogc` (the
  same with `bf16=False`) can be added; fp32 is the slowest (~0.7x bf16's tokens/s here).

Both load the base from the same HF directory, converted from the GGUF once by
`lmforge.model.load.hf_dir` in this (parent) process before any side runs, so no side pays the
conversion. Each side runs under its own wrapper process that reports the side's peak RSS
(getrusage(RUSAGE_CHILDREN).ru_maxrss after it exits, and the peak of the process tree's summed
RSS polled with psutil; the larger is reported). Measured:

- tokens/s: non-padding input tokens over training wall time, the first step (warm-up) excluded on
  both sides: (tokens after step N - tokens after step 1) / (time at step N - time at step 1);
- peak RSS (GB) of the whole side process (load, data preparation and training);
- tokens/CPU-s: the same tokens over the process CPU seconds of those steps (all threads), less
  sensitive to other load on the machine; shown where the side logs `cpu_s` per step;
- last-10 train loss: mean training loss of the last 10 steps (each side's own batches, in its own
  order, so a few % apart says little; the held-out loss is the one held to the 2 % target);
- held-out loss: response-token cross-entropy of each trained adapter on the last 200 records
  (trained on by neither side), fp32, by one shared function (bench/_sft_heldout.py), plus the
  untrained base for reference.

Targets (issue): lmforge >= 1.5x TRL's tokens/s, <= 1.0x its peak RSS, held-out loss within 2 %.
The machine is noisy (2 shared cores): use --runs 3 for medians; the sides of a run go one after
another (order rotated between runs), never concurrently; each run line shows the
CPU time the rest of the machine used while each side ran (in cores; it should be ~0), and
before each side the bench waits up to --wait-idle seconds for the machine to go idle.

    python bench/finetune_cpu.py [--steps 40] [--runs 1] [--json results.json]
        [--data ../shared/data/alpaca_5000.json] [--base-model smollm2-135m-instruct]
        [--config configs/finetune/smollm2-lora-alpaca.yaml] [--trl-configs bf16,bf16-nogc,fp32]
        [--skip-trl | --skip-lmforge] [lmforge key=value overrides ...]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
DEFAULT_CONFIG = ROOT / "configs" / "finetune" / "smollm2-lora-alpaca.yaml"
TARGET_SPEED, TARGET_MEM, TARGET_LOSS = 1.5, 1.0, 0.02
TRL_CONFIGS = {  # name -> (precision, gradient checkpointing)
    "fp32": ("fp32", "on"), "bf16": ("bf16", "on"),
    "fp32-nogc": ("fp32", "off"), "bf16-nogc": ("bf16", "off"),
}


# ---------------------------------------------------------------- RSS wrapper (runs as its own process)
def rss_wrap(report: str, cmd: list[str]) -> int:
    """Run `cmd` as the only child; write its peak RSS, wall and CPU time to `report` (JSON)."""
    import psutil

    t0 = time.perf_counter()
    child = subprocess.Popen(cmd)
    proc = psutil.Process(child.pid)
    tree_peak = 0
    while child.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
            tree_peak = max(tree_peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    Path(report).write_text(json.dumps({
        "rc": child.returncode, "wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime,
        "ru_maxrss_bytes": ru.ru_maxrss * 1024, "tree_peak_bytes": tree_peak,
    }))
    return child.returncode


def cpu_busy_s() -> float:
    """CPU seconds spent busy by the whole machine so far (all cores, from /proc/stat)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def wait_idle(max_wait: float) -> float:
    """Wait (up to max_wait s) until the machine is nearly idle: other users' jobs skew timings badly
    (torch's OpenMP threads stall whenever a core is taken). Returns the busy cores seen last."""
    t_end = time.monotonic() + max_wait
    while True:
        b0 = cpu_busy_s()
        time.sleep(2.0)
        busy = (cpu_busy_s() - b0) / 2.0
        if busy < 0.15 or time.monotonic() >= t_end:
            return busy
        print(f"[{time.strftime('%H:%M:%S')}] waiting: {busy:.2f} cores busy with other work", file=sys.stderr,
              flush=True)
        time.sleep(10.0)


def run_side(name: str, cmd: list[str], work: Path, max_wait: float = 0.0) -> dict:
    """Run one side under the RSS wrapper; stdout+stderr go to work/<name>.log."""
    report, log = work / f"{name}.rss.json", work / f"{name}.log"
    busy_before = wait_idle(max_wait)
    busy0 = cpu_busy_s()
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, __file__, "--rss-wrap", str(report), "--", *cmd],
                             cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    busy = cpu_busy_s() - busy0
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{name} failed (exit {rc}); last lines of {log}:\n{tail}")
    r = json.loads(report.read_text())
    # CPU the rest of the machine used while this side ran, in cores (the side's own CPU time,
    # children included, subtracted): ~0 on a quiet machine; much above 0.1 makes the timing suspect.
    r["busy_cores_before"] = busy_before
    r["others_cores"] = max(0.0, busy - r["cpu_s"]) / r["wall_s"]
    r["peak_rss_gb"] = max(r["ru_maxrss_bytes"], r["tree_peak_bytes"]) / 1e9
    return r


# ---------------------------------------------------------------- metrics
def summarize(steps: list[dict], time_key: str, cpu_key: str | None) -> dict:
    """tokens/s from step 1 to the last step (step 1 = warm-up, excluded), last-10 mean loss."""
    steps = sorted(steps, key=lambda r: r["step"])
    first, last = steps[0], steps[-1]
    if first["step"] != 1:
        raise RuntimeError(f"metrics start at step {first['step']}, need every step logged from 1")
    if len(steps) < 2:
        raise RuntimeError("need at least 2 logged steps (the first is excluded as warm-up)")
    dt = last[time_key] - first[time_key]
    dtok = last["tokens"] - first["tokens"]
    out = {
        "steps": last["step"], "tokens_per_sec": dtok / dt, "train_s": dt, "tokens": dtok,
        "last10_loss": statistics.fmean(r["loss"] for r in steps[-10:]),
        "loss_curve": [(r["step"], round(r["loss"], 4)) for r in steps],
    }
    if cpu_key and all(cpu_key in r for r in (first, last)):
        out["tokens_per_cpu_s"] = dtok / (last[cpu_key] - first[cpu_key])
    return out


def lmforge_adapter(out: Path) -> Path:
    """OUT/checkpoints/latest: a directory/symlink, or a file naming the checkpoint directory."""
    latest = out / "checkpoints" / "latest"
    d = latest if latest.is_dir() else out / "checkpoints" / latest.read_text().strip()
    if not (d / "adapter_config.json").is_file():
        raise RuntimeError(f"{d} holds no PEFT adapter (adapter_config.json)")
    return d


def run_lmforge(a, train_jsonl: Path, work: Path, tag: str) -> dict:
    out = work / f"lmforge{tag}"
    cmd = [sys.executable, "-m", "lmforge", "finetune", str(a.config),
           f"base_model={a.base_model}", f"out_dir={out}", f"data.path={train_jsonl}", "data.val_size=0",
           f"data.max_length={a.max_length}", "method=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0.05",
           "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]", f"train.max_steps={a.steps}",
           f"train.micro_batch_size={a.batch}", "train.grad_accum=1", f"train.lr={a.lr}", "train.min_lr=0",
           f"train.warmup_steps={a.warmup}", "train.schedule=cosine", "train.weight_decay=0",
           "train.grad_clip=1.0", f"train.beta1={a.beta1}", f"train.beta2={a.beta2}", "train.eps=1e-8",
           "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0",
           f"seed={a.seed}", "resume=never", "log.progress=false", "log.tensorboard=false", *a.overrides]
    proc = run_side(f"lmforge{tag}", cmd, work, a.wait_idle)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "loss" in r and "tokens" in r and "elapsed_s" in r]
    cpu_key = "cpu_s" if steps and "cpu_s" in steps[0] else None
    return {"side": "lmforge", **summarize(steps, "elapsed_s", cpu_key), **proc,
            "adapter": str(lmforge_adapter(out))}


def run_trl(a, conf: str, hf: Path, work: Path, tag: str) -> dict:
    precision, gc = TRL_CONFIGS[conf]
    out = work / f"trl-{conf}{tag}"
    cmd = [sys.executable, str(BENCH / "_trl_sft.py"), "--hf", str(hf), "--data", str(a.data),
           "--n-train", str(a.n_train), "--out", str(out), "--precision", precision,
           "--gradient-checkpointing", gc, "--steps", str(a.steps), "--batch", str(a.batch),
           "--lr", str(a.lr), "--warmup", str(a.warmup), "--max-length", str(a.max_length),
           "--beta1", str(a.beta1), "--beta2", str(a.beta2), "--seed", str(a.seed)]
    proc = run_side(f"trl-{conf}{tag}", cmd, work, a.wait_idle)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    info = json.loads((out / "info.json").read_text())
    return {"side": f"TRL {conf}", **summarize(steps, "t", "cpu_s"), **proc, "trl_info": info,
            "adapter": str(out / "adapter")}


def heldout(a, hf: Path, adapters: dict[str, str], work: Path) -> dict:
    cmd = [sys.executable, str(BENCH / "_sft_heldout.py"), "--hf", str(hf), "--data", str(a.data),
           "--start", str(a.n_train), "--max-length", str(a.max_length),
           *(f"{k}={v}" for k, v in adapters.items())]
    print(f"[{time.strftime('%H:%M:%S')}] held-out eval of {', '.join(adapters)}", file=sys.stderr, flush=True)
    with open(work / "heldout.log", "w") as log:
        res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"held-out eval failed; see {work / 'heldout.log'}:\n"
                           + (work / "heldout.log").read_text()[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--rss-wrap":
        return rss_wrap(sys.argv[2], sys.argv[sys.argv.index("--") + 1:])

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca JSON array (instruction/input/output)")
    p.add_argument("--heldout", type=int, default=200, help="the last N records: held out from both sides")
    p.add_argument("--base-model", default="smollm2-135m-instruct", help="lmforge model spec (alias, dir, .gguf)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="lmforge finetune config")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1 on both sides (TRL's default)")
    p.add_argument("--beta2", type=float, default=0.999, help="AdamW beta2 on both sides (TRL's default; lmforge's is 0.95)")
    p.add_argument("--runs", type=int, default=1, help="repeat and report medians (the machine is noisy)")
    p.add_argument("--trl-configs", default="bf16,bf16-nogc",
                   help=f"comma list of TRL rows: {', '.join(TRL_CONFIGS)} (-nogc: gradient checkpointing off)")
    p.add_argument("--wait-idle", type=float, default=300,
                   help="before each side, wait up to this many seconds for other work on the machine to finish")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--skip-lmforge", action="store_true")
    p.add_argument("--skip-heldout", action="store_true")
    p.add_argument("--keep", type=Path, help="keep the work files (logs, metrics, adapters) in this directory")
    p.add_argument("--json", type=Path, help="write all results here")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for the lmforge run")
    a = p.parse_args()
    if not a.data.is_file():
        print(f"error: {a.data} not found (pass --data alpaca.json)", file=sys.stderr)
        return 2
    confs = [] if a.skip_trl else [c.strip() for c in a.trl_configs.split(",") if c.strip()]
    bad = [c for c in confs if c not in TRL_CONFIGS]
    if bad:
        print(f"error: unknown --trl-configs {bad}; choose from {list(TRL_CONFIGS)}", file=sys.stderr)
        return 2
    records = json.loads(a.data.read_text())
    a.n_train = len(records) - a.heldout

    # One conversion, in the parent, before any side is measured; both sides load this directory.
    from lmforge.model.load import hf_dir
    t0 = time.perf_counter()
    hf = Path(hf_dir(a.base_model))
    print(f"base: {a.base_model} -> {hf} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if not a.skip_lmforge and Path(a.base_model).expanduser().suffix == ".gguf":
        print("note: lmforge gets the .gguf spec and resolves it to the same cache", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="lmforge-ftbench-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train_jsonl = work / "train.jsonl"
        with open(train_jsonl, "w") as f:
            for r in records[: a.n_train]:
                f.write(json.dumps(r) + "\n")

        sides = ([] if a.skip_lmforge else ["lmforge"]) + [f"trl:{c}" for c in confs]
        runs: list[dict[str, dict]] = []
        for i in range(a.runs):
            order = sides[i % len(sides):] + sides[: i % len(sides)]  # rotate: no side always runs first
            res = {}
            for s in order:
                tag = f"-run{i}"
                if s == "lmforge":
                    res["lmforge"] = run_lmforge(a, train_jsonl, work, tag)
                else:
                    c = s.split(":", 1)[1]
                    res[f"TRL {c}"] = run_trl(a, c, hf, work, tag)
                r = res["lmforge" if s == "lmforge" else f"TRL {s.split(':', 1)[1]}"]
                print(f"[{time.strftime('%H:%M:%S')}] {r['side']}: {r['tokens_per_sec']:.1f} tok/s, "
                      f"{r['peak_rss_gb']:.2f} GB, last-10 loss {r['last10_loss']:.4f}", file=sys.stderr)
            runs.append(res)

        ho = {}
        if not a.skip_heldout:
            adapters = {"base": ""}
            for i, res in enumerate(runs):
                adapters.update({f"{k}#{i}": r["adapter"] for k, r in res.items()})
            ho = heldout(a, hf, adapters, work)
            for i, res in enumerate(runs):
                for k, r in res.items():
                    r["heldout_loss"] = ho[f"{k}#{i}"]["loss"]

    names = list(runs[0])
    med = {n: {} for n in names}
    for n in names:
        for key in ("tokens_per_sec", "tokens_per_cpu_s", "peak_rss_gb", "last10_loss", "heldout_loss"):
            vals = [res[n][key] for res in runs if key in res[n]]
            med[n][key] = statistics.median(vals) if len(vals) == len(runs) else None

    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    print(f"machine: {os.cpu_count()} cores; steps: {a.steps}; batch {a.batch}; runs: {a.runs} (medians); "
          f"train records: {a.n_train}; held-out: {a.heldout}; base dir: {hf}")
    print("| side | tokens/s | tokens/CPU-s | peak RSS GB | last-10 train loss | held-out loss |")
    print("|---|---|---|---|---|---|")
    for n in names:
        m = med[n]
        print(f"| {n} | {fmt(m['tokens_per_sec'], '.1f')} | {fmt(m['tokens_per_cpu_s'], '.1f')} | "
              f"{fmt(m['peak_rss_gb'], '.2f')} | {fmt(m['last10_loss'], '.4f')} | {fmt(m['heldout_loss'], '.4f')} |")
    if "base" in ho:
        print(f"| untrained base | | | | | {ho['base']['loss']:.4f} |")

    ratios = {}
    if "lmforge" in med:
        lm = med["lmforge"]
        for n in [x for x in names if x != "lmforge"]:
            t = med[n]
            speed = lm["tokens_per_sec"] / t["tokens_per_sec"]
            mem = lm["peak_rss_gb"] / t["peak_rss_gb"]
            line = (f"vs {n}: tokens/s {speed:.2f}x (target >= {TARGET_SPEED}x) "
                    f"{'OK' if speed >= TARGET_SPEED else 'MISS'}; "
                    f"peak RSS {mem:.2f}x (target <= {TARGET_MEM}x) {'OK' if mem <= TARGET_MEM else 'MISS'}")
            ratios[n] = {"tokens_per_sec": speed, "peak_rss": mem}
            if lm["heldout_loss"] is not None and t["heldout_loss"] is not None:
                diff = (lm["heldout_loss"] - t["heldout_loss"]) / t["heldout_loss"]
                line += (f"; held-out loss diff {diff * 100:+.2f}% (target within {TARGET_LOSS * 100:.0f}%) "
                         f"{'OK' if abs(diff) <= TARGET_LOSS else 'MISS'}")
                ratios[n]["heldout_loss_rel_diff"] = diff
            train_diff = (lm["last10_loss"] - t["last10_loss"]) / t["last10_loss"]
            line += f"; last-10 train loss diff {train_diff * 100:+.2f}% (different batches: not the target)"
            ratios[n]["last10_loss_rel_diff"] = train_diff
            print(line)
        trl = [med[n] for n in names if n != "lmforge"]
        if len(trl) > 1:
            best_speed = max(t["tokens_per_sec"] for t in trl)
            best_mem = min(t["peak_rss_gb"] for t in trl)
            print(f"vs best TRL row: tokens/s {lm['tokens_per_sec'] / best_speed:.2f}x the fastest, "
                  f"peak RSS {lm['peak_rss_gb'] / best_mem:.2f}x the smallest")
    for i, res in enumerate(runs):
        print(f"run {i}: " + "; ".join(
            f"{n} {r['tokens_per_sec']:.1f} tok/s over steps 1-{r['steps']} ({r['train_s']:.0f} s), "
            f"{r['peak_rss_gb']:.2f} GB, process {r['wall_s']:.0f} s, other work {r['others_cores']:.2f} cores"
            for n, r in res.items()))
    noisy = sorted({n for res in runs for n, r in res.items() if r["others_cores"] > 0.1})
    if noisy:
        print(f"warning: other work used > 0.1 cores while {', '.join(noisy)} ran: those timings are suspect "
              f"(rerun on a quiet machine, or with --runs 3)")

    if a.json:
        a.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "hf_dir": str(hf), "medians": med, "ratios": ratios, "heldout": ho, "runs": runs,
        }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
