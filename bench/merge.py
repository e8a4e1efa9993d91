"""bench: `lmforge merge` vs `mergekit-yaml` on the same YAML and SmolLM2-135M-sized models: wall time and peak RSS
(median of N runs each, measured by /usr/bin/time in the same session), and the largest difference between the two
outputs.

The models are the real SmolLM2-135M-Instruct (`lmforge export smollm2-135m-instruct`, float32) and two copies
perturbed by independent noise (two "fine-tunes"). mergekit pins its own torch and transformers, so it runs from
its own venv:
    python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install mergekit torch==2.13.0
    .venv/bin/python bench/merge.py [--repeats 3] [--methods linear ties slerp] [--work /tmp/bench-merge]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "linear": """\
models:
  - model: {ft1}
    parameters:
      weight: 0.5
  - model: {ft2}
    parameters:
      weight: 0.5
merge_method: linear
dtype: float32
""",
    "ties": """\
models:
  - model: {ft1}
    parameters:
      density: 0.5
      weight: 0.5
  - model: {ft2}
    parameters:
      density: 0.5
      weight: 0.5
merge_method: ties
base_model: {base}
parameters:
  normalize: true
dtype: float32
""",
    "slerp": """\
models:
  - model: {base}
  - model: {ft1}
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
}


def make_models(work: Path) -> dict[str, Path]:
    """base: SmolLM2-135M-Instruct exported once; ft1, ft2: base + N(0, 0.002) noise of their own seed."""
    import torch
    from safetensors.torch import load_file, save_file

    base = work / "base"
    if not (base / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "lmforge", "export", "smollm2-135m-instruct", "--out", str(base)],
                       check=True, cwd=ROOT)
    paths = {"base": base}
    for name, seed in (("ft1", 1), ("ft2", 2)):
        d = paths[name] = work / name
        if (d / "model.safetensors").is_file():
            continue
        shutil.copytree(base, d, dirs_exist_ok=True)
        torch.manual_seed(seed)
        weights = {k: v + torch.randn_like(v) * 0.002 for k, v in load_file(str(base / "model.safetensors")).items()}
        save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    return paths


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one command, from /usr/bin/time."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", f.name, *cmd], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
        wall, rss_kb = f.read().split()[-2:]
    return float(wall), int(rss_kb) / 1024


def max_diff(a: Path, b: Path) -> float:
    """Largest absolute difference over every tensor of two HF directories (read one tensor at a time)."""
    from lmforge.model.merge import Source

    sa, sb = Source(str(a), a), Source(str(b), b)
    if sorted(sa.header) != sorted(sb.header):
        return float("inf")
    worst = 0.0
    for name in sa.header:
        worst = max(worst, (sa.read(name).double() - sb.read(name).double()).abs().max().item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", default=str(ROOT / ".venv-mergekit/bin/mergekit-yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-merge")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = make_models(args.work)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in args.methods:
        config = args.work / f"{method}.yaml"
        config.write_text(CONFIGS[method].format(**models))
        outs = {"lmforge": args.work / f"out-lmforge-{method}", "mergekit": args.work / f"out-mergekit-{method}"}
        commands = {
            "lmforge": [sys.executable, "-m", "lmforge", "merge", str(config), "--out", str(outs["lmforge"]),
                        "--overwrite"],
            "mergekit": [args.mergekit, str(config), str(outs["mergekit"]), "--no-write-model-card"],
        }
        runs: dict[str, list[tuple[float, float]]] = {"lmforge": [], "mergekit": []}
        for _ in range(args.repeats):  # interleaved, so both tools see the same machine load
            for tool in ("mergekit", "lmforge"):
                shutil.rmtree(outs[tool], ignore_errors=True)
                runs[tool].append(timed(commands[tool], env))
        wall = {t: statistics.median(w for w, _ in r) for t, r in runs.items()}
        rss = {t: statistics.median(m for _, m in r) for t, r in runs.items()}
        rows.append((method, wall, rss, max_diff(outs["lmforge"], outs["mergekit"])))
        print(f"{method}: lmforge {wall['lmforge']:.1f} s {rss['lmforge']:.0f} MB, mergekit {wall['mergekit']:.1f} s "
              f"{rss['mergekit']:.0f} MB", file=sys.stderr)
    print(f"SmolLM2-135M-Instruct (float32, 3 models on disk), median of {args.repeats} runs each, "
          f"{os.cpu_count()} CPU cores\n")
    print("| method | lmforge wall s | mergekit wall s | wall ratio (mk/lmf) | lmforge peak RSS MB | "
          "mergekit peak RSS MB | RSS ratio (lmf/mk) | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method, wall, rss, diff in rows:
        print(f"| {method} | {wall['lmforge']:.1f} | {wall['mergekit']:.1f} | {wall['mergekit'] / wall['lmforge']:.2f}x"
              f" | {rss['lmforge']:.0f} | {rss['mergekit']:.0f} | {rss['lmforge'] / rss['mergekit']:.2f} "
              f"| {diff:.2g} |")


if __name__ == "__main__":
    main()
