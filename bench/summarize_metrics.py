"""Markdown table of steady-state throughput, MFU and peak memory from pretrain runs' metrics.jsonl."""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import yaml

MFU_TARGET = 0.50  # anchors: llm-foundry MPT-7B 46 % (H100), torchtitan Llama-3-8B 33-39 %, TinyLlama 56 % (A100)


def summarize_run(run_dir: Path, warmup: int = 10) -> dict:
    """One row: medians over the train lines after `warmup` steps (compile and warm-up excluded)."""
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
    by_step = {r["step"]: r for r in lines if "loss" in r}  # a step logged twice keeps its last line
    train = [by_step[s] for s in sorted(by_step)]
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no train lines")
    steady = [r for r in train if r["step"] > warmup] or train[-1:]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    mfus = [r["mfu"] for r in steady if "mfu" in r]
    mfu = statistics.median(mfus) if mfus else None
    return {
        "run": run_dir.name, "preset": cfg["model"]["preset"],
        "seq": cfg["data"].get("seq_len") or cfg["model"]["max_seq_len"],
        "micro_batch": train[-1].get("micro_batch_size", cfg["train"]["micro_batch_size"]),
        "steps": train[-1]["step"], "steady_steps": len(steady),
        "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steady),
        "mfu": mfu,
        "peak_mem_gb": max(r.get("mem_gb", 0.0) for r in train),
        "first_step_s": train[0]["elapsed_s"], "final_loss": train[-1]["loss"],
    }


def device_name() -> str:
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def table(rows: list[dict], device: str) -> str:
    """The rows as a markdown table, the MFU target beside each result."""
    pct = lambda v: "n/a" if v is None else f"{100 * v:.1f} %"  # noqa: E731
    out = [f"device: {device}",
           "",
           "| run | preset | seq | micro batch | steps | tokens/s | MFU | target | peak mem GB "
           "| step-1 s (compile) | final loss |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['run']} | {r['preset']} | {r['seq']} | {r['micro_batch']} | {r['steps']} "
                   f"| {r['tokens_per_sec']:,.0f} | {pct(r['mfu'])} "
                   f"| ≥ {100 * MFU_TARGET:.0f} % | {r['peak_mem_gb']:.2f} | {r['first_step_s']:.1f} "
                   f"| {r['final_loss']:.4f} |")
    out += ["", "tokens/s and MFU: medians over the steps after warm-up; MFU = 6 x (body + output head) "
            "parameters + attention FLOPs per token, as torchtitan counts them; "
            "peak mem = torch.cuda.max_memory_allocated (peak RSS on CPU)."]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the medians (compile, warm-up)")
    p.add_argument("--device", default=None, help="device name for the header (default: asks torch)")
    a = p.parse_args()
    rows = [summarize_run(d, a.warmup) for d in a.run_dirs]
    text = table(rows, a.device or device_name())
    print(text)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_pretrain.md").write_text(text + "\n")
        (out / "gpu_pretrain.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
