"""EWC (train/ewc.py): the penalty's gradient, the Fisher estimator, accumulation through the engine, and a resumed
fine-tuning run that reuses its Fisher instead of recomputing it."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT, read_metrics, save_tiny_sft_base

from lmforge.train.ewc import EWCPenalty, fisher_diagonal, trainable


def toy() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)  # frozen parameters carry no penalty
    return model


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean(), len(x)


def test_penalty_gradient_equals_lambda_fisher_times_displacement():
    model = toy()
    params = trainable(model)
    g = torch.Generator().manual_seed(1)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
    theta = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in params.items()}
    penalty = EWCPenalty(params, fisher, theta, lam=3.5)
    value = penalty()
    value.backward()
    closed = sum(0.5 * 3.5 * (fisher[n] * (p.detach() - theta[n]) ** 2).sum() for n, p in params.items())
    assert float(value.detach()) == pytest.approx(float(closed), rel=1e-6) and float(value.detach()) > 0
    assert "0.bias" not in params
    for n, p in params.items():
        torch.testing.assert_close(p.grad, 3.5 * fisher[n] * (p.detach() - theta[n]), rtol=1e-6, atol=1e-7)

    # The wrapped objective adds it while training and leaves evaluation (no grad) to the task loss alone.
    batch = (torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g))
    wrapped = penalty.wrap(mse)
    assert float(wrapped(model, batch)[0]) == pytest.approx(float(mse(model, batch)[0] + value), rel=1e-6)
    with torch.no_grad():
        assert float(wrapped(model, batch)[0]) == pytest.approx(float(mse(model, batch)[0]), rel=1e-6)
    assert penalty.metrics.take("train") == {"ewc_penalty": pytest.approx(float(value), rel=1e-6)}
    assert penalty.metrics.take("train") == {}


def test_fisher_is_the_mean_squared_batch_gradient_at_the_start_weights():
    model = toy()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)) for _ in range(3)]
    fisher = fisher_diagonal(model, mse, batches, "fp32")
    for n, p in trainable(model).items():
        expected = sum(torch.autograd.grad(mse(model, b)[0], p)[0] ** 2 for b in batches) / 3
        torch.testing.assert_close(fisher[n], expected)
    assert all(p.grad is None for p in model.parameters())  # the estimate leaves no gradients behind


def engine_gradients(accum: int, rows: torch.Tensor, targets: torch.Tensor, penalty_on: bool) -> dict:
    """The gradients the engine's forward_backward accumulates for one step of 4 rows in `accum` micro-batches."""
    from lmforge.train.config import GuardConfig, TrainConfig
    from lmforge.train.distributed import Runtime
    from lmforge.train.job import Job
    from lmforge.train.metrics import MetricsLogger
    from lmforge.train.state import TrainState, build_engine
    from lmforge.train.step import forward_backward

    model = toy()
    params = trainable(model)
    objective = mse
    if penalty_on:
        fisher = {n: torch.full(p.shape, 0.7) for n, p in params.items()}
        theta = {n: torch.zeros(p.shape) for n, p in params.items()}
        objective = EWCPenalty(params, fisher, theta, lam=2.0).wrap(mse)
    mbs = 4 // accum
    job = Job(model=model, objective=objective,
              train_batches=lambda step, m, a, r, w: [(rows[i * m:(i + 1) * m], targets[i * m:(i + 1) * m])
                                                      for i in range(a)],
              eval_batches=None, save_model=lambda d, sd: None, load_model=lambda d: {}, tokens_per_step=4)
    tc, guards, rt = TrainConfig(micro_batch_size=mbs, grad_accum=accum, device="cpu"), GuardConfig(), Runtime()
    engine = build_engine(model, [], tc, guards, rt, "fp32")
    logger = MetricsLogger(None, False, 1, 0, False, False, "", {}, False)
    forward_backward(job, engine, TrainState(micro_batch_size=mbs, grad_accum=accum), rt, guards, logger)
    return {n: p.grad.clone() for n, p in params.items()}


def test_penalty_counts_once_per_step_under_accumulation():
    g = torch.Generator().manual_seed(3)
    rows, targets = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)
    one, four = engine_gradients(1, rows, targets, True), engine_gradients(4, rows, targets, True)
    plain = engine_gradients(1, rows, targets, False)
    model = toy()
    for n, p in trainable(model).items():
        torch.testing.assert_close(four[n], one[n], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(one[n] - plain[n], 2.0 * 0.7 * p.detach(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama with a character tokenizer and two Alpaca-shaped tasks (addition as the old, subtraction the new)."""
    d = tmp_path_factory.mktemp("ewc")
    rng = random.Random(0)
    for name, op, f in (("old", "add", lambda a, b: a + b), ("new", "sub", lambda a, b: a - b)):
        rows = [(rng.randint(0, 40), rng.randint(0, 40)) for _ in range(64)]
        (d / f"{name}.jsonl").write_text("".join(
            json.dumps({"instruction": f"{op} {a} and {b}", "input": "", "output": f"{f(a, b)}"}) + "\n"
            for a, b in rows))
    save_tiny_sft_base(d / "base", "0123456789 addsub-")
    return {"base": d / "base", "old": d / "old.jsonl", "new": d / "new.jsonl"}


def ewc_config(tiny: dict, out, *extra: str):
    from lmforge.config import load_config
    from lmforge.train.config import FinetuneConfig

    return load_config(FinetuneConfig, None, [
        f"base_model={tiny['base']}", f"data.path={tiny['new']}", f"out_dir={out}", "method=lora",
        "lora.target_modules=all-linear", "lora.dropout=0", "train.device=cpu", "train.threads=1",
        "train.precision=fp32", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
        "train.log_every=1", "train.eval_every=0", "train.ckpt_every=3", "data.val_size=4", "data.max_length=256",
        "log.progress=false", "log.tensorboard=false", "ewc.lambda=1000", f"ewc.fisher_data.path={tiny['old']}",
        "ewc.fisher_batches=3", *extra])


def test_lora_run_computes_the_fisher_once_and_a_resumed_run_reuses_it(tiny, tmp_path, capsys):
    from safetensors import safe_open

    from lmforge.train.finetune import finetune

    out = tmp_path / "run"
    finetune(ewc_config(tiny, out, "train.max_steps=3"))
    first = capsys.readouterr().out
    fisher_file = out / "ewc_fisher.safetensors"
    assert "ewc: computed the diagonal Fisher over 3 batches" in first and fisher_file.is_file()
    stamp = fisher_file.stat().st_mtime_ns
    with safe_open(str(fisher_file), "pt") as f:
        names = list(f.keys())
        assert all("lora_" in n for n in names) and {n.split("/")[0] for n in names} == {"fisher", "theta"}
        # LoRA's B starts at zero, so A's gradient is zero at θ*: the Fisher lives on the B matrices.
        assert sum(float(f.get_tensor(n).sum()) for n in names if n.startswith("fisher/") and "lora_B" in n) > 0

    finetune(ewc_config(tiny, out, "train.max_steps=6"))
    second = capsys.readouterr().out
    assert "ewc: reusing the Fisher" in second and "computed the diagonal Fisher" not in second
    assert fisher_file.stat().st_mtime_ns == stamp
    penalty = {r["step"]: r["ewc_penalty"] for r in read_metrics(out) if "ewc_penalty" in r}
    assert sorted(penalty) == [1, 2, 3, 4, 5, 6]
    assert penalty[1] == 0.0  # θ = θ* before the first update
    assert penalty[2] > 0 and penalty[4] > 0  # step 4 starts at the resumed weights: θ* is the run's start, not those
    assert any(e.get("event") == "resumed" for e in read_metrics(out))


@pytest.mark.slow  # three torchrun/CLI processes: ~25 s of CPU, minutes of wall time on a busy machine
def test_ddp_two_processes_match_one_with_accumulation(tiny, tmp_path):
    """torchrun with 2 processes (gloo, DDP; rank 0 computes the Fisher, rank 1 reads it) takes the same steps,
    penalty included, as 1 process with grad_accum=2."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1")
    common = ["finetune", f"base_model={tiny['base']}", f"data.path={tiny['new']}", "method=full", "train.device=cpu",
              "train.precision=fp32", "train.micro_batch_size=2", "train.lr=3e-3", "train.warmup_steps=0",
              "train.max_steps=4", "train.log_every=1", "train.eval_every=0", "data.val_size=4",
              "data.max_length=256", "log.progress=false", "log.tensorboard=false", "ewc.lambda=1e4",
              f"ewc.fisher_data.path={tiny['old']}", "ewc.fisher_batches=2"]

    def run(out, *launcher_and_extra, extra=()):
        cmd = [sys.executable, *launcher_and_extra, "-m", "lmforge", *common, f"out_dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "one", extra=("train.grad_accum=2",))
    run(tmp_path / "two", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        extra=("train.parallel=ddp",))
    one, two = ({r["step"]: r for r in read_metrics(tmp_path / d) if "loss" in r} for d in ("one", "two"))
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for s in one:
        assert two[s]["loss"] == pytest.approx(one[s]["loss"], rel=1e-5), (s, one[s], two[s])
        assert two[s]["ewc_penalty"] == pytest.approx(one[s]["ewc_penalty"], rel=1e-4, abs=1e-9)
    assert one[4]["ewc_penalty"] > 0
