"""DeepSpeed's own engine (train/deepspeed_engine.py) on CPU: 2 torchrun processes over gloo, ZeRO-3, fp32.

The runs use only the module's functions with our model and objective (not the training loop) and are compared
with one process of plain PyTorch AdamW on the same global batches: ZeRO moves where state lives, not what is
computed. Measured on this machine (6 steps, 2 micro-batches of 4 per process, warmup + cosine lr from 3e-3,
clipping at 1.0, step 5 skipped by the guard's verdict): ZeRO-3 losses agree to 1.8e-7, grad norms to 1.8e-7
relative, the exported fp32 weights to 6.0e-6 (Adam's update is lr-sized whatever the gradient, so rounding in a
near-zero gradient shows there); ZeRO-2 with DeepSpeedCPUAdam (no skip) to 1.8e-7, 1.0e-7 and 1.2e-6. Resuming
from the step-3 checkpoint reproduces the uninterrupted run bit for bit. The asserted tolerances (losses 1e-5,
norms 1e-4 relative, weights 3e-5) leave room for another CPU's rounding. The file runs in about 25 s once
DeepSpeed's C++ ops are built; the first run on a machine JIT-builds them with ninja (deepspeed_shm_comm for any
CPU run, cpu_adam for offload: about 4 minutes on 2 cores, then cached in ~/.cache/torch_extensions).
Run as a script (`torchrun ... tests/test_deepspeed_engine.py OUT`), this file is the worker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, require, synthetic_text
from lmforge.model.build import build_model
from lmforge.model.config import ModelConfig
from lmforge.train.config import TrainConfig
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import build_adamw
from lmforge.train.schedule import lr_at

STEPS, SAVE_AT, WORLD = 6, 3, 2
SKIP = 4  # the 0-based step whose update the guard skips (as for a loss spike): no update, no Adam step
TC = TrainConfig(micro_batch_size=4, grad_accum=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=STEPS,
                 grad_clip=1.0, weight_decay=0.1, precision="fp32", device="cpu")
DS = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": "auto",
      "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
      "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}}
# ZeRO-Offload: optimizer state and step on the CPU (DeepSpeedCPUAdam, built by ninja on first use, ~50 s, then cached).
DS_OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "bf16": {"enabled": False}}
CONFIGS = {"zero3": DS, "zero2_offload": DS_OFFLOAD}
SEQ = 32


def corpus() -> tuple[torch.Tensor, int]:
    """Character ids of the synthetic corpus and the vocabulary size."""
    text = synthetic_text(40_000)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text]), len(chars)


def global_batch(ids: torch.Tensor, step: int) -> torch.Tensor:
    """The windows (SEQ + 1 tokens) of optimizer step `step`: WORLD x grad_accum micro-batches of micro_batch_size."""
    n = WORLD * TC.grad_accum * TC.micro_batch_size
    starts = torch.randint(0, len(ids) - SEQ - 1, (n,), generator=torch.Generator().manual_seed(1000 + step))
    return torch.stack([ids[s:s + SEQ + 1] for s in starts])


def micro_batch(windows: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = windows[chunk * TC.micro_batch_size:(chunk + 1) * TC.micro_batch_size]
    return rows[:, :-1], rows[:, 1:]


def lr_of(step: int) -> float:
    return lr_at(step, TC.lr, TC.min_lr, TC.warmup_steps, STEPS, TC.schedule)


def tiny_model(vocab: int, seed: int):
    return build_model(ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=SEQ), seed).module


# ---- the worker: torchrun runs this file ----

def train_ds(engine, ids, rank: int, start: int, end: int, ckpt: Path | None = None) -> tuple[list, list]:
    """Steps start..end-1 on DeepSpeed's engine: (losses over all ranks, grad norms); saves after step SAVE_AT.

    Where the optimizer can skip on the device (ZeRO with a fused AdamW), every step gets a verdict and step
    SKIP is skipped; ZeRO-Offload's DeepSpeedCPUAdam cannot skip, so it takes every step.
    """
    import torch.distributed as dist

    from lmforge.train import deepspeed_engine as dse

    losses, norms = [], []
    for step in range(start, end):
        dse.set_lr(engine, lr_of(step))
        windows, loss_sum = global_batch(ids, step), torch.zeros(())
        for m in range(TC.grad_accum):
            loss, _ = causal_lm(engine, micro_batch(windows, m * WORLD + rank))
            dse.backward(engine, loss)
            loss_sum += loss.detach()
        skip = torch.tensor(step == SKIP) if dse.skips_on_device(engine) else None
        norm, applied = dse.update(engine, skip)
        assert applied
        dist.all_reduce(loss_sum)
        losses.append(loss_sum.item() / (TC.grad_accum * WORLD))
        norms.append(norm)
        if ckpt is not None and step + 1 == SAVE_AT:
            dse.save(engine, ckpt, {"step": step + 1, "note": "client state"})
    return losses, norms


def worker(out: Path, config: str) -> None:
    """Uninterrupted run with a save at step SAVE_AT, then (ZeRO-3) a fresh engine resumed from it; rank 0 writes both."""
    import torch.distributed as dist

    from lmforge.train import deepspeed_engine as dse
    from lmforge.train.distributed import Runtime

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    rt = Runtime(rank, dist.get_world_size(), rank, torch.device("cpu"))
    ids, vocab = corpus()
    ds = CONFIGS[config]
    wanted, why = dse.engine_wanted(ds, "cpu")
    assert wanted, why
    engine = dse.initialize(tiny_model(vocab, 0), TC, ds, rt, "fp32")
    losses, norms = train_ds(engine, ids, rank, 0, STEPS, out / "ckpt" if config == "zero3" else None)
    state = dse.full_state_dict(engine)
    losses2, norms2, state2, client = [], [], {}, {}
    if config == "zero3":
        resumed = dse.initialize(tiny_model(vocab, 1), TC, ds, rt, "fp32")  # other weights: the load must replace them
        client = dse.load(resumed, out / "ckpt")
        losses2, norms2 = train_ds(resumed, ids, rank, client["step"], STEPS)
        state2 = dse.full_state_dict(resumed)
    if rank == 0:
        torch.save({"state": state, "state_resumed": state2}, out / "weights.pt")
        (out / "run.json").write_text(json.dumps({
            "losses": losses, "norms": norms, "resumed_losses": losses2, "resumed_norms": norms2, "client": client,
            "zero_stage": engine.zero_optimization_stage(), "optimizer": type(engine.optimizer).__name__,
            "inner_optimizer": type(engine.optimizer.optimizer).__name__,
            "gas": engine.gradient_accumulation_steps(), "why": why}))
    dist.barrier()
    dist.destroy_process_group()


# ---- the tests ----

def test_the_engine_runs_on_cuda_or_when_asked_on_a_cpu(monkeypatch):
    from lmforge.train.deepspeed_engine import ENGINE_ENV, engine_wanted

    require("deepspeed", why="DeepSpeed's engine path (pip install -e '.[deepspeed]')")
    monkeypatch.delenv(ENGINE_ENV, raising=False)
    assert engine_wanted(DS, "cuda") == (True, "CUDA")
    assert engine_wanted(DS, "cpu") == (False, "no CUDA device (set LMFORGE_DEEPSPEED_ENGINE=1 to run it on the cpu)")
    monkeypatch.setenv(ENGINE_ENV, "1")
    assert engine_wanted(DS, "cpu") == (True, "LMFORGE_DEEPSPEED_ENGINE=1 on cpu")
    nvme = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}
    assert engine_wanted(nvme, "cpu") == (False, "zero_optimization.offload_param.device=nvme is not run on a cpu here")
    monkeypatch.setenv(ENGINE_ENV, "0")
    assert engine_wanted(DS, "cuda") == (False, "LMFORGE_DEEPSPEED_ENGINE=0")


def test_auto_values_come_from_train_and_the_scheduler_is_dropped():
    from lmforge.train.deepspeed_engine import complete_config

    ds, filled = complete_config(DS, TC, WORLD, "fp32")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (4, 2, 1.0)
    assert ds["train_batch_size"] == 16 and "scheduler" not in ds and "optimizer" not in ds
    assert ds["bf16"] == {"enabled": False} and DS["train_micro_batch_size_per_gpu"] == "auto"  # the input is kept
    assert filled[:3] == ["train_micro_batch_size_per_gpu=4", "gradient_accumulation_steps=2", "gradient_clipping=1.0"]
    assert filled[-1] == "scheduler dropped (lmforge sets the learning rate each step: cosine)"
    ds, filled = complete_config({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}, TC, WORLD, "bf16")
    assert ds["bf16"] == {"enabled": True} and "precision=bf16" in filled
    guide = json.loads((ROOT / "configs" / "pretrain" / "ds_zero3_offload.json").read_text())
    ds, filled = complete_config(guide, TC, WORLD, "fp32")
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["bf16"]) == (2, 4, {"enabled": True})
    assert ds["train_batch_size"] == 16 and ds["steps_per_print"] == 10 and "scheduler" not in ds


def test_a_checkpoint_from_another_number_of_processes_is_a_one_line_error(tmp_path):
    from types import SimpleNamespace

    from lmforge.config import ConfigError
    from lmforge.train.deepspeed_engine import load

    engine = SimpleNamespace(zero_optimization_stage=lambda: 3, dp_world_size=4)
    with pytest.raises(ConfigError, match=r"holds no DeepSpeed checkpoint"):
        load(engine, tmp_path)
    (tmp_path / "deepspeed").mkdir()
    for rank in range(2):
        (tmp_path / "deepspeed" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    with pytest.raises(ConfigError, match=r"saved by 2 processes and this run has 4; resume with 2 "):
        load(engine, tmp_path)

def reference(vocab: int, ids: torch.Tensor, skip: int | None = SKIP) -> tuple[list, list, dict]:
    """One process, plain PyTorch AdamW, the same global batches, step `skip` not applied: (losses, grad norms, state dict)."""
    model = tiny_model(vocab, 0)
    opt = build_adamw(model, TC.lr, TC.weight_decay, (TC.beta1, TC.beta2), TC.eps, torch.device("cpu"))
    n_micro = TC.grad_accum * WORLD
    losses, norms = [], []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = lr_of(step)
        windows, total = global_batch(ids, step), 0.0
        for chunk in range(n_micro):
            loss, _ = causal_lm(model, micro_batch(windows, chunk))
            (loss / n_micro).backward()
            total += loss.item()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), TC.grad_clip)))
        if step != skip:
            opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / n_micro)
    return losses, norms, model.state_dict()


def launch(tmp_path_factory, config: str) -> Path:
    """The 2-process worker's output directory for CONFIGS[config]."""
    require("deepspeed", why="DeepSpeed's engine path (pip install -e '.[deepspeed]')")
    out = tmp_path_factory.mktemp(f"ds-{config}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
           str(Path(__file__).resolve()), str(out), config]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LMFORGE_DEEPSPEED_ENGINE": "1",
                               "DS_ACCELERATOR": "cpu"})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return out


@pytest.fixture(scope="module")
def ds_run(tmp_path_factory) -> Path:
    return launch(tmp_path_factory, "zero3")


@pytest.fixture(scope="module")
def ref_run() -> tuple[list, list, dict]:
    ids, vocab = corpus()
    return reference(vocab, ids)


@pytest.fixture(scope="module")
def ref_run_no_skip() -> tuple[list, list, dict]:
    ids, vocab = corpus()
    return reference(vocab, ids, skip=None)


def assert_matches_reference(out: Path, ref_run) -> None:
    """Losses, grad norms and the exported full fp32 weights of a DeepSpeed run against the plain reference."""
    run = json.loads((out / "run.json").read_text())
    ref_losses, ref_norms, ref_state = ref_run
    assert ref_losses[-1] < ref_losses[0] - 0.2  # it trains at all
    assert max(ref_norms) > TC.grad_clip  # clipping was exercised
    assert run["losses"] == pytest.approx(ref_losses, abs=1e-5)
    assert run["norms"] == pytest.approx(ref_norms, rel=1e-4)
    state = torch.load(out / "weights.pt")["state"]
    assert set(state) == set(ref_state)
    for name, ref in ref_state.items():
        assert state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], ref, atol=3e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_zero3_on_two_processes_matches_plain_adamw(ds_run, ref_run):
    run = json.loads((ds_run / "run.json").read_text())
    assert (run["zero_stage"], run["optimizer"], run["gas"]) == (3, "DeepSpeedZeroOptimizer_Stage3", 2)
    assert run["inner_optimizer"] == "AdamW"
    assert run["why"] == "LMFORGE_DEEPSPEED_ENGINE=1 on cpu"
    assert_matches_reference(ds_run, ref_run)


def test_a_skipped_step_changes_nothing(ref_run, ref_run_no_skip):
    """The reference skipping step SKIP differs from one that does not: the DeepSpeed run above matched the former."""
    assert ref_run[0][:SKIP + 1] == ref_run_no_skip[0][:SKIP + 1]
    assert abs(ref_run[0][SKIP + 1] - ref_run_no_skip[0][SKIP + 1]) > 1e-3


def test_zero2_with_optimizer_offload_matches_plain_adamw(tmp_path_factory, ref_run_no_skip):
    out = launch(tmp_path_factory, "zero2_offload")
    run = json.loads((out / "run.json").read_text())
    assert (run["zero_stage"], run["optimizer"], run["gas"]) == (2, "DeepSpeedZeroOptimizer", 2)
    assert run["inner_optimizer"] == "DeepSpeedCPUAdam"
    assert_matches_reference(out, ref_run_no_skip)


def test_save_load_and_continue_equals_the_uninterrupted_run(ds_run):
    run = json.loads((ds_run / "run.json").read_text())
    assert run["client"] == {"step": SAVE_AT, "note": "client state"}
    assert run["resumed_losses"] == pytest.approx(run["losses"][SAVE_AT:], abs=1e-6)
    assert run["resumed_norms"] == pytest.approx(run["norms"][SAVE_AT:], rel=1e-5)
    weights = torch.load(ds_run / "weights.pt")
    for name, value in weights["state"].items():
        torch.testing.assert_close(weights["state_resumed"][name], value, atol=1e-6, rtol=0)
    assert (ds_run / "ckpt" / "deepspeed").is_dir() and (ds_run / "ckpt" / "zero_to_fp32.py").is_file()


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
