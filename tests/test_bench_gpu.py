"""bench/gpu_pretrain.sh end to end on CPU (--dry-run), and the metrics summarizer on hand-written lines."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, require
from lmforge.model.config import ModelConfig

spec = importlib.util.spec_from_file_location("summarize_metrics", ROOT / "bench" / "summarize_metrics.py")
summarize_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(summarize_metrics)


@pytest.mark.slow
def test_dry_run_prints_a_row_per_preset_with_numeric_throughput(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_TMP": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", "bench/gpu_pretrain.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for preset in ("124m", "1b"):
        row = re.search(rf"^\| {preset} \| tiny \| 64 \| \d+ \| 5 \| ([\d,]+) \|", proc.stdout, re.M)
        assert row, proc.stdout
        assert float(row.group(1).replace(",", "")) > 0
    assert "≥ 50 %" in proc.stdout
    assert "| 124m |" in (tmp_path / "out" / "gpu_pretrain.md").read_text()
    assert not (tmp_path / "work" / "1b" / "checkpoints").exists()


def write_run(run_dir, records, preset="124m"):
    run_dir.mkdir()
    model = ModelConfig(preset=preset, vocab_size=32000, max_seq_len=2048).model_dump(mode="json")
    cfg = {"model": model, "data": {"seq_len": None}, "train": {"micro_batch_size": 16}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_summary_takes_medians_after_warmup_and_the_peak_memory(tmp_path):
    recs = [{"step": s, "loss": 10.0 - s / 10, "tokens_per_sec": 5.0, "elapsed_s": 30.0 + s, "mem_gb": 20.0,
             "mfu": 0.01, "micro_batch_size": 16} for s in range(1, 11)]
    recs[2]["mem_gb"] = 31.5  # the peak falls inside the warm-up: still counted
    recs.append({"step": 10, "event": "checkpoint", "detail": "x", "time": 0.0})
    for s, tps, mfu in [(11, 100.0, 0.1), (12, 999.0, 0.9), (12, 300.0, 0.3), (13, 200.0, 0.2), (14, 1000.0, 0.5)]:
        recs.append({"step": s, "loss": 9.0 + s / 100, "tokens_per_sec": tps, "elapsed_s": 40.0 + s, "mem_gb": 25.0,
                     "mfu": mfu, "micro_batch_size": 16})  # step 12 logged twice (a resume): the last line counts
    recs.append({"step": 14, "val_loss": 9.5, "val_ppl": 13000.0})
    write_run(tmp_path / "124m", recs)

    row = summarize_metrics.summarize_run(tmp_path / "124m", warmup=10)
    assert row["tokens_per_sec"] == 250.0  # median of 100, 300, 200, 1000
    assert row["mfu"] == pytest.approx(0.25)
    assert row["peak_mem_gb"] == 31.5
    assert row["final_loss"] == pytest.approx(9.14)
    assert (row["preset"], row["seq"], row["micro_batch"], row["steps"], row["steady_steps"]) == ("124m", 2048, 16, 14, 4)
    assert row["first_step_s"] == 31.0


def test_summary_without_mfu_says_na(tmp_path):
    recs = [{"step": s, "loss": 5.0, "tokens_per_sec": 10.0 * s, "elapsed_s": s, "mem_gb": 1.0} for s in (1, 2, 3)]
    write_run(tmp_path / "1b", recs, preset="1b")
    row = summarize_metrics.summarize_run(tmp_path / "1b", warmup=1)
    assert row["mfu"] is None and row["tokens_per_sec"] == 25.0
    text = summarize_metrics.table([row], "cpu")
    assert "| 1b | 1b | 2048 | 16 | 3 | 25 | n/a | ≥ 50 % | 1.00 |" in text


GPU_CHECK_ROWS = ("environment", "pretrain 124m", "pretrain 1b", "FSDP checkpoint + resume", "~1B test model",
                  "QLoRA finetune", "serving engine, 8 in flight", "serving engine, 32 in flight",
                  "eval perplexity, bf16", "DeepSpeed engine, ZeRO-3")


@pytest.mark.slow
def test_gpu_check_dry_run_fills_every_row_of_its_table(tmp_path):
    require("bitsandbytes", why="the qlora section")
    require("peft", why="the qlora section")
    require("deepspeed", why="the deepspeed section")
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_TMP": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table in proc.stdout
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith(("| check", "| ---"))]
    assert len(rows) == len(GPU_CHECK_ROWS), table
    for label, line in zip(GPU_CHECK_ROWS, rows):
        assert line.startswith(f"| {label}"), (label, line)
        assert "FAILED" not in line and "skipped" not in line, line
    numbers = {label: line for label, line in zip(GPU_CHECK_ROWS, rows)}
    assert re.search(r"\| MFU n/a, [\d,]+ tokens/s, peak [\d.]+ GB \|", numbers["pretrain 1b"])
    # Resuming from the step-4 checkpoint reproduces the uninterrupted run exactly on CPU in fp32.
    assert "ok: resumed at step 4, max loss difference over steps 5-8 = 0.0e+00" in numbers["FSDP checkpoint + resume"]
    for c in (8, 32):
        assert re.search(rf"\| [\d,]+ output tokens/s \| {2 * c} requests x 8 tokens", numbers[f"serving engine, {c} in flight"])
    assert re.search(r"\| [\d,]+ tokens/s, peak [\d.]+ GB \|", numbers["QLoRA finetune"])
    assert re.search(r"\| [\d,]+ tokens/s, MFU n/a, peak [\d.]+ GB \| 1 process, ZeRO-3, fp32; stopped at step 3 "
                     r"and resumed from DeepSpeed's checkpoint, 6 steps", numbers["DeepSpeed engine, ZeRO-3"])
    assert re.search(r"\| token ppl [\d.]+, [\d,]+ tokens/s", numbers["eval perplexity, bf16"])


@pytest.mark.slow
def test_gpu_check_reports_a_failing_section_and_runs_the_rest(tmp_path):
    """A section that breaks gets FAILED and its one-line reason in its row, the sections after it still
    run, and the script exits 1. The break: a Python that dies on the model section's build script."""
    fake = tmp_path / "python"
    fake.write_text("#!/usr/bin/env bash\n"
                    "if [[ ${1:-} == - && ${2:-} == */model ]]; then echo 'ImportError: no CUDA torch here' >&2; exit 1; fi\n"
                    f"exec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "BENCH_TMP": str(tmp_path / "work"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 1, proc.stdout[-5000:] + proc.stderr[-3000:]
    rows = {line.split(" | ")[0][2:]: line for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert "| FAILED: ImportError: no CUDA torch here |" in rows["~1B test model (preset 1b, random init)"]
    for label in ("QLoRA finetune of the ~1B model", "serving engine, 8 in flight", "serving engine, 32 in flight",
                  "eval perplexity, bf16"):
        assert "| FAILED: the model section did not build " in rows[label], rows[label]
    for label in ("environment", "pretrain 124m (compile, flash SDPA, bf16)", "FSDP checkpoint + resume (124m)",
                  "DeepSpeed engine, ZeRO-3 (124m)"):
        assert "FAILED" not in rows[label], rows[label]
