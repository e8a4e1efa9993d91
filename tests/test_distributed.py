"""Distributed pretraining on CPU with gloo: `torchrun --nproc_per_node 2 -m lmforge pretrain`.

Two processes with DDP or FSDP2 must train the same model as one process with the same global batch
(one process with grad_accum=2 sees the windows two processes with grad_accum=1 see together), write
files from rank 0 only, and resume from their own checkpoints.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.tokens.shards import write_shards

STEPS = 20
TIMEOUT = 240
# fp32 so the comparison measures the parallelism, not autocast rounding; eval_batches=3 is odd on
# purpose (ranks hold 2 and 1 validation batches: FSDP must pad to equal forwards or it hangs).
COMMON = [
    "model.preset=tiny", "model.max_seq_len=32", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
    "train.log_every=1", "train.eval_every=10", "train.eval_batches=3", "train.ckpt_every=10",
    "train.warmup_steps=5", "train.lr=1e-3", "train.device=cpu", "train.precision=fp32",
    "log.progress=false", "log.tensorboard=false",
]


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE",
                        "LMFORGE_DEBUG_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_pretrain(data: Path, out: Path, *overrides: str, nproc: int = 1, check: bool = True,
                 env: dict[str, str] | None = None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "lmforge", "pretrain", f"data.dir={data}", f"out_dir={out}", *COMMON, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(**(env or {})))
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_lines(out: Path) -> dict[int, dict]:
    lines = [r for r in records(out) if "loss" in r]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"steps logged more than once (did a rank other than 0 write?): {steps}"
    return {r["step"]: r for r in lines}


def val_lines(out: Path) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in records(out) if "val_loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """~200 KB of deterministic synthetic text, character-tokenized (no dependence on ../shared)."""
    root = tmp_path_factory.mktemp("dist_data")
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven cats run far into the quiet night".split()
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
                     for _ in range(4000))
    (root / "text.txt").write_text(text)
    write_shards(root / "text.txt", "char", root / "shards")
    return root / "shards"


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """Finished runs, made on first use and shared: 'single' (1 process, grad_accum=2), 'ddp', 'fsdp'."""
    root = tmp_path_factory.mktemp("dist_runs")
    done: dict = {}

    def get(name: str):
        if name not in done:
            out = root / name
            if name == "single":
                proc = run_pretrain(data, out, "train.grad_accum=2")
            else:
                proc = run_pretrain(data, out, "train.grad_accum=1", f"train.parallel={name}", nproc=2)
            done[name] = (out, proc)
        return done[name]

    return get


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(runs, parallel):
    ref_out, _ = runs("single")
    out, proc = runs(parallel)
    ref, got = train_lines(ref_out), train_lines(out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.3  # it trains at all
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-3), f"loss at step {s}"
        # Under FSDP2 clip_grad_norm_ returns a DTensor: the logged number must be the global norm.
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-3), f"grad_norm at step {s}"
    assert abs(got[STEPS]["loss"] - ref[STEPS]["loss"]) < 1e-3
    ref_val, got_val = val_lines(ref_out), val_lines(out)
    assert sorted(got_val) == sorted(ref_val) == [0, 10, 20]
    for s in ref_val:
        assert got_val[s] == pytest.approx(ref_val[s], abs=1e-4), f"val_loss at step {s}"

    # Rank 0 alone prints and writes; the checkpoint holds the full (gathered, unsharded) weights.
    assert proc.stdout.count(f"steps {STEPS} in ") == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000020"
    from safetensors.torch import load_file
    ref_w = load_file(str(ref_out / "checkpoints" / "step-0000020" / "model.safetensors"))
    got_w = load_file(str(out / "checkpoints" / "step-0000020" / "model.safetensors"))
    assert got_w.keys() == ref_w.keys()
    for k in ref_w:
        assert got_w[k].shape == ref_w[k].shape, k
        assert (got_w[k] - ref_w[k]).abs().max().item() < 1e-4, k


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_run_resumes_like_uninterrupted(data, runs, tmp_path, parallel):
    """Stop a 2-process run right after its step-10 checkpoint, rerun the same command: steps 11..20 are
    those of the uninterrupted run. The stop is a NaN at step 11 with guards set to stop at once: the
    schedule still depends on max_steps=20, and the interruption lands at a known step every time."""
    full_out, _ = runs(parallel)
    full = train_lines(full_out)
    out = tmp_path / "resumed"
    args = ("train.grad_accum=1", f"train.parallel={parallel}")
    proc = run_pretrain(data, out, *args, "guards.debug_nan_steps=[11]", "guards.max_bad_steps=1",
                        "guards.on_repeated_bad=stop", nproc=2, check=False)
    assert proc.returncode != 0, "the debug NaN at step 11 should have stopped the run"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-0000010"
    assert max(train_lines(out)) == 10

    if parallel == "fsdp":  # the sharded checkpoint also resumes on one process (2 -> 1), resharded by DCP
        assert (out / "checkpoints" / "step-0000010" / "dcp" / ".metadata").is_file()
        assert not (out / "checkpoints" / "step-0000010" / "model.safetensors").exists()  # no gathered copy
        one = tmp_path / "resumed_on_one"
        shutil.copytree(out, one)
        run_pretrain(data, one, "train.grad_accum=2")
        assert "written by 2 processes, resumed on 1" in json.dumps(records(one))
        on_one = train_lines(one)
        for s in range(11, STEPS + 1):
            assert on_one[s]["loss"] == pytest.approx(full[s]["loss"], abs=1e-5), f"2 -> 1: loss at step {s}"

    run_pretrain(data, out, *args, nproc=2)
    events = [r for r in records(out) if r.get("event") == "resumed"]
    assert len(events) == 1 and events[0]["step"] == 10 and "step-0000010" in events[0]["detail"]
    resumed = train_lines(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in range(11, STEPS + 1):
        assert resumed[s]["loss"] == pytest.approx(full[s]["loss"], abs=1e-6), f"loss at step {s}"
    assert val_lines(out)[STEPS] == pytest.approx(val_lines(full_out)[STEPS], abs=1e-6)


def test_one_process_checkpoint_resumes_on_two(data, runs, tmp_path):
    """1 -> 2: the one-process run's step-10 checkpoint (the full format) resumes under FSDP on two processes,
    which shard it, and steps 11..20 are those of the one-process run."""
    single_out, _ = runs("single")
    out = tmp_path / "from_single"
    run_pretrain(data, out, "train.grad_accum=1", "train.parallel=fsdp",
                 f"resume={single_out / 'checkpoints' / 'step-0000010'}", nproc=2)
    ref, got = train_lines(single_out), train_lines(out)
    assert sorted(got) == list(range(11, STEPS + 1))
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), f"1 -> 2: loss at step {s}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_oom_and_nan_on_one_rank_are_acted_on_by_both(data, tmp_path, parallel):
    """An OOM at step 3 and a NaN loss at step 6, both on rank 1 only (the LMFORGE_DEBUG_RANK test hook): both
    ranks back off to micro-batch 2 x 2 and both skip step 6, so every loss equals that of a run started at
    micro-batch 2 x 2 whose NaN strikes every rank. A rank acting alone would train on other windows (or with a
    NaN update) and the losses would part."""
    short = ("train.max_steps=8", f"train.parallel={parallel}", "train.eval_every=0")
    out, ref_out = tmp_path / "one_rank", tmp_path / "small_micro"
    run_pretrain(data, out, *short, "train.micro_batch_size=4", "train.grad_accum=1", "guards.debug_oom_steps=[3]",
                 "guards.debug_nan_steps=[6]", nproc=2, env={"LMFORGE_DEBUG_RANK": "1"})
    run_pretrain(data, ref_out, *short, "train.micro_batch_size=2", "train.grad_accum=2",
                 "guards.debug_nan_steps=[6]", nproc=2)
    got, ref = train_lines(out), train_lines(ref_out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert [(e["step"], e["event"]) for e in records(out) if e.get("event") in ("oom", "skip_nonfinite")] \
        == [(3, "oom"), (6, "skip_nonfinite")]
    assert [r["micro_batch_size"] for r in got.values()] == [4, 4, 2, 2, 2, 2, 2, 2]
    assert [r["grad_accum"] for r in got.values()] == [1, 1, 2, 2, 2, 2, 2, 2]
    for s in ref:
        if s == 6:
            assert got[s]["loss"] != got[s]["loss"] and ref[s]["loss"] != ref[s]["loss"]  # NaN in both
            continue
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), f"loss at step {s}"


def test_several_processes_need_a_parallel_mode(monkeypatch):
    from lmforge.train.distributed import init_runtime

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(RuntimeError, match="train.parallel=ddp or fsdp"):
        init_runtime("cpu", "none")


def test_eval_shard_on_one_process_counts_every_batch():
    from lmforge.train.distributed import Runtime, eval_shard

    def batches(micro_bs, rank, world):
        yield from (("batch", i) for i in range(rank, 5, world))

    got = list(eval_shard(batches, 4, Runtime(), "fsdp"))
    assert got == [(("batch", i), True) for i in range(5)]
