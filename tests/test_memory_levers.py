"""Memory levers: train.cpu_offload (FSDP2 CPUOffloadPolicy), train.parallel=hsdp, and the `deepspeed:` ds_config mapping.

The runs are launched as users launch them (`torchrun -m lmforge pretrain`, gloo on CPU, fp32) and compared
with one process accumulating the same micro-batches: offload and HSDP move where state lives, not what is
computed, so the losses agree to float rounding (1e-5).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import ROOT, events, read_metrics, require
from lmforge.config import ConfigError, load_config
from lmforge.train.config import PretrainConfig, TrainConfig
from lmforge.train.deepspeed import deepspeed_notice, load_ds_config, map_ds_config

GUIDE = ROOT / "configs" / "pretrain" / "ds_zero3_offload.json"
STEPS = 8
# eval_batches=3 is odd on purpose: under FSDP/HSDP a rank with fewer validation batches must pad its forwards.
COMMON = [
    "model.preset=tiny", "model.max_seq_len=32", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
    "train.log_every=1", "train.eval_every=0", "train.eval_batches=3", "train.ckpt_every=0", "train.warmup_steps=2",
    "train.lr=1e-3", "train.device=cpu", "train.precision=fp32", "log.progress=false", "log.tensorboard=false",
]


def pretrain(data: Path, out: Path, *overrides: str, nproc: int = 1, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """`lmforge pretrain` on `nproc` torchrun processes (one thread each), failing with its output."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, "-m", "lmforge", "pretrain", f"data.dir={data}", f"out_dir={out}", *COMMON, *overrides]
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env={**base, **(env or {}), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def final_val(out: Path) -> float:
    return [r["val_loss"] for r in read_metrics(out) if "val_loss" in r][-1]


def assert_same_run(got_out: Path, ref_out: Path, tol: float = 1e-5) -> None:
    got, ref = losses(got_out), losses(ref_out)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS]["loss"] < ref[1]["loss"] - 0.2  # it trains at all
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=tol, nan_ok=True), f"loss at step {s}"
        if not math.isfinite(ref[s]["grad_norm"]):  # a skipped step: DeepSpeed reports inf where torch has nan
            assert not math.isfinite(got[s]["grad_norm"]), f"grad_norm at step {s}"
            continue
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-4), f"grad_norm at step {s}"
    assert final_val(got_out) == pytest.approx(final_val(ref_out), abs=tol)


@pytest.fixture(scope="module")
def two_process_ref(char_shards, tmp_path_factory) -> Path:
    """One process accumulating 2 micro-batches: what the 2-process offloaded and ds_config runs must match
    (plain 2-process FSDP matches it too, tests/test_distributed.py; one process is the cheaper reference)."""
    out = tmp_path_factory.mktemp("levers") / "one"
    pretrain(char_shards, out, "train.grad_accum=2")
    return out


# ---- the runs ----

def test_cpu_offload_two_processes_match_one_process(char_shards, two_process_ref, tmp_path):
    pretrain(char_shards, tmp_path / "offload", "train.parallel=fsdp", "train.cpu_offload=true", nproc=2)
    assert_same_run(tmp_path / "offload", two_process_ref)


def test_ds_config_file_runs_on_fsdp2_with_the_notice(char_shards, two_process_ref, tmp_path):
    """ZeRO-2 with optimizer offload from a JSON file: fsdp, gathered parameters kept to backward, CPU offload."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                    "overlap_comm": True},
                              "bf16": {"enabled": False}, "train_micro_batch_size_per_gpu": 4,
                              "gradient_clipping": 1.0}))
    proc = pretrain(char_shards, tmp_path / "ds", f"deepspeed={ds}", nproc=2)
    notices = [line for line in proc.stdout.splitlines() if line.startswith("deepspeed:")]
    assert len(notices) == 1, proc.stdout  # rank 0 alone prints it
    assert "DeepSpeed's engine is not used" in notices[0]
    assert "zero_optimization.stage=2 -> train.parallel=fsdp" in notices[0]
    assert "train.reshard_after_forward=false" in notices[0] and "train.cpu_offload=true" in notices[0]
    assert notices[0].endswith("not mapped: zero_optimization.overlap_comm")
    written = (tmp_path / "ds" / "config.yaml").read_text()
    assert "cpu_offload: true" in written and "reshard_after_forward: false" in written
    assert_same_run(tmp_path / "ds", two_process_ref)


def test_ds_config_runs_on_deepspeeds_engine_skips_resumes_and_exports(char_shards, tmp_path):
    """With DeepSpeed's engine asked for on the CPU: ZeRO-3 on 2 processes trains as one process of lmforge's
    engine does (same global batch, same NaN step skipped), through a resume from its own checkpoint, and ends
    with HF weights; the checkpoints are DeepSpeed's partitions."""
    require("deepspeed", why="DeepSpeed's engine path (pip install -e '.[deepspeed]')")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
                              "train_micro_batch_size_per_gpu": 4, "gradient_clipping": "auto"}))
    nan = "guards.debug_nan_steps=[6]"
    ref = tmp_path / "ref"
    pretrain(char_shards, ref, "train.grad_accum=2", nan)
    out, engine = tmp_path / "ds", {"LMFORGE_DEEPSPEED_ENGINE": "1"}
    first = pretrain(char_shards, out, f"deepspeed={ds}", nan, "train.max_steps=4", f"train.decay_steps={STEPS}",
                     nproc=2, env=engine)
    notice = next(line for line in first.stdout.splitlines() if line.startswith("deepspeed:"))
    assert "runs on DeepSpeed's engine (ZeRO-3, fp32; LMFORGE_DEEPSPEED_ENGINE=1 on cpu)" in notice
    step4 = out / "checkpoints" / "step-0000004"
    assert torch.load(step4 / "trainer_state.pt", weights_only=True)["format"] == "deepspeed"
    assert len(list((step4 / "deepspeed").glob("*optim_states.pt"))) == 2  # one partition per process
    pretrain(char_shards, out, f"deepspeed={ds}", nan, nproc=2, env=engine)
    assert [e["event"] for e in events(out) if e["event"] in ("resumed", "skip_nonfinite")] == ["resumed", "skip_nonfinite"]
    assert_same_run(out, ref)
    from transformers import AutoModelForCausalLM
    final = out / "checkpoints" / "step-0000008"
    assert AutoModelForCausalLM.from_pretrained(final).num_parameters() > 0


def test_a_deepspeed_checkpoint_resumes_only_on_deepspeeds_engine_and_loads_no_code(char_shards, tmp_path):
    """ZeRO-2 on one process (no torchrun) resumes from its own checkpoint, whose files DeepSpeed reads with
    weights_only=True; a planted pickle is refused before it runs, and lmforge's engine refuses the checkpoint."""
    require("deepspeed", why="DeepSpeed's engine path (pip install -e '.[deepspeed]')")
    from lmforge.train.deepspeed_engine import read_checkpoint_file
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    out, engine = tmp_path / "run", {"LMFORGE_DEEPSPEED_ENGINE": "1"}
    bf16 = "train.precision=bf16"
    pretrain(char_shards, out, f"deepspeed={ds}", bf16, "train.max_steps=2", env=engine)
    pretrain(char_shards, out, f"deepspeed={ds}", bf16, "train.max_steps=3", env=engine)
    assert [e["event"] for e in events(out) if e["event"] == "resumed"] == ["resumed"]
    assert sorted(losses(out)) == [1, 2, 3]

    partitions = sorted((out / "checkpoints" / "step-0000003" / "deepspeed").glob("*.pt"))
    assert len(partitions) == 2 and all(read_checkpoint_file(f) for f in partitions)
    planted = tmp_path / "planted.pt"
    torch.save({"optimizer_state_dict": _Planted(tmp_path / "pwned")}, planted)
    with pytest.raises(Exception, match="Weights only load failed"):
        read_checkpoint_file(planted)
    assert not (tmp_path / "pwned").exists()

    with pytest.raises(AssertionError, match=r"was written by DeepSpeed's engine and this run trains on the other"):
        pretrain(char_shards, out, f"deepspeed={ds}", bf16, "train.max_steps=4", env={"LMFORGE_DEEPSPEED_ENGINE": "0"})
    shutil.copy(planted, next(f for f in partitions if f.name.endswith("model_states.pt")))
    with pytest.raises(AssertionError, match=r"error: deepspeed: .* holds a pickle lmforge does not load \(Trying to "
                                             r"load unsupported GLOBAL posix.system"):
        pretrain(char_shards, out, f"deepspeed={ds}", bf16, "train.max_steps=4", env=engine)
    assert not (tmp_path / "pwned").exists()


class _Planted:
    """A pickle that runs a command (touch `path`) when loaded in full."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_hsdp_two_by_two_matches_one_process(char_shards, tmp_path):
    """4 processes as 2 replicas x 2 shards against 1 process accumulating the same 4 micro-batches."""
    pretrain(char_shards, tmp_path / "one", "train.grad_accum=4")
    pretrain(char_shards, tmp_path / "hsdp", "train.parallel=hsdp", "train.shard_degree=2", nproc=4)
    assert_same_run(tmp_path / "hsdp", tmp_path / "one")


# ---- wrapping, without processes ----

def _record_fully_shard(monkeypatch) -> tuple[list[dict], list[tuple]]:
    """Replace fully_shard and init_device_mesh with recorders; returns (fully_shard kwargs, mesh requests)."""
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    calls, meshes = [], []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: calls.append(kw) or module)
    monkeypatch.setattr(device_mesh, "init_device_mesh",
                        lambda kind, shape, mesh_dim_names: meshes.append((kind, shape, mesh_dim_names)) or "mesh")
    return calls, meshes


def test_wrap_model_hands_fsdp2_the_offload_policy_and_the_hsdp_mesh(monkeypatch):
    from torch.distributed.fsdp import CPUOffloadPolicy

    from lmforge.train.distributed import Runtime, wrap_model

    calls, meshes = _record_fully_shard(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # shard_degree's default: one node's processes
    blocks = [nn.Linear(2, 2), nn.Linear(2, 2)]
    wrap_model(nn.Sequential(*blocks), Runtime(rank=0, world_size=4), "hsdp", blocks, None, cpu_offload=True,
               reshard_after_forward=False)
    assert meshes == [("cpu", (2, 2), ("replicate", "shard"))]
    assert len(calls) == 3 and all(c["mesh"] == "mesh" and c["reshard_after_forward"] is False for c in calls)
    policy = calls[0]["offload_policy"]
    assert isinstance(policy, CPUOffloadPolicy) and policy.pin_memory is False  # pinning needs an accelerator

    calls.clear()
    meshes.clear()
    wrap_model(nn.Sequential(*blocks), Runtime(rank=0, world_size=2), "fsdp", blocks, None)
    assert meshes == [] and all(c["mesh"] is None and c["reshard_after_forward"] is True for c in calls)
    assert not isinstance(calls[0]["offload_policy"], CPUOffloadPolicy)


def test_shard_degree_must_divide_the_world(monkeypatch):
    from lmforge.train.distributed import Runtime, hsdp_mesh

    _record_fully_shard(monkeypatch)
    with pytest.raises(ConfigError, match="train.shard_degree 3 does not divide the 4 processes"):
        hsdp_mesh(Runtime(rank=0, world_size=4), 3)


def test_cpu_offload_on_one_process_is_an_error():
    from lmforge.train.config import GuardConfig
    from lmforge.train.distributed import Runtime
    from lmforge.train.state import build_engine

    tc = TrainConfig(parallel="fsdp", cpu_offload=True)
    with pytest.raises(ConfigError, match="needs several processes"):
        build_engine(nn.Linear(2, 2), [], tc, GuardConfig(), Runtime(), "fp32")


@pytest.mark.parametrize("keys,message", [
    ({"parallel": "ddp", "cpu_offload": True}, "train.cpu_offload=true needs train.parallel=fsdp or hsdp"),
    ({"parallel": "none", "cpu_offload": True}, "train.cpu_offload=true needs train.parallel=fsdp or hsdp"),
    ({"parallel": "fsdp", "shard_degree": 2}, "train.shard_degree applies to train.parallel=hsdp only"),
    ({"parallel": "ddp", "reshard_after_forward": False}, "train.reshard_after_forward=false needs"),
    ({"parallel": "hsdp", "precision": "fp16"}, "fp16 is not supported with train.parallel=hsdp"),
])
def test_lever_keys_outside_their_mode_are_one_line_errors(char_shards, keys, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(PretrainConfig, None, [f"data.dir={char_shards}", *(f"train.{k}={v}" for k, v in keys.items())])
    assert "\n" not in str(err.value)


# ---- the ds_config mapping ----

def _leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        out += _leaf_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]
    return out


def test_the_guides_ds_config_maps_to_fsdp2_with_cpu_offload():
    ds, name = load_ds_config(GUIDE)
    assert name == str(GUIDE)
    overrides, mapped, not_mapped = map_ds_config(ds)
    assert overrides == {
        "parallel": "fsdp", "cpu_offload": True, "precision": "bf16", "micro_batch_size": 2, "grad_accum": 4,
        "grad_clip": 1.0, "log_every": 10, "lr": 3e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1,
        "schedule": "linear", "warmup_steps": 100, "decay_steps": 2000, "min_lr": 0.0,
    }
    assert not_mapped == ["wall_clock_breakdown", "zero_optimization.offload_optimizer.pin_memory",
                          "zero_optimization.offload_param.pin_memory", "zero_optimization.overlap_comm",
                          "zero_optimization.contiguous_gradients",
                          "zero_optimization.stage3_gather_16bit_weights_on_model_save",
                          "scheduler.params.warmup_type=log"]
    # Nothing silently ignored: every setting of the file is named on one side or the other.
    named = " ".join(mapped + not_mapped)
    for leaf in _leaf_keys(ds):
        top = leaf.split(".")[0]
        assert leaf in named or (top in ("bf16", "optimizer", "scheduler", "train_micro_batch_size_per_gpu",
                                         "gradient_accumulation_steps", "gradient_clipping", "steps_per_print")
                                 and top in named), leaf


def test_the_yaml_example_loads_the_mapping(char_shards):
    cfg = load_config(PretrainConfig, ROOT / "configs" / "pretrain" / "ds_zero3_offload.yaml", [f"data.dir={char_shards}"])
    tc = cfg.train
    assert (tc.parallel, tc.cpu_offload, tc.precision, tc.micro_batch_size, tc.grad_accum) == ("fsdp", True, "bf16", 2, 4)
    assert (tc.schedule, tc.warmup_steps, tc.decay_steps, tc.lr, tc.min_lr) == ("linear", 100, 2000, 3e-4, 0.0)
    assert tc.max_steps == 2000 and tc.eval_every == 500  # the YAML's own train keys stay


def test_the_notice_is_one_line_and_says_which_engine_runs(monkeypatch):
    import importlib.util

    line = deepspeed_notice(GUIDE, 1)
    assert "\n" not in line
    assert line.startswith(f"deepspeed: {GUIDE} mapped to FSDP2 (DeepSpeed's engine is not used: ")
    assert "zero_optimization.offload_param.device=cpu -> train.cpu_offload=true" in line
    assert "; not mapped: wall_clock_breakdown, " in line
    real_find_spec = importlib.util.find_spec
    monkeypatch.delenv("LMFORGE_DEEPSPEED_ENGINE", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: object() if n == "deepspeed" else real_find_spec(n, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "DeepSpeed's engine is not used: LoRA adapters train on FSDP2" \
        in deepspeed_notice(GUIDE, 1, not_here="LoRA adapters train on FSDP2")
    engine = deepspeed_notice(GUIDE, 1)
    assert engine.startswith(f"deepspeed: {GUIDE} runs on DeepSpeed's engine (ZeRO-3, optimizer offload cpu, "
                             "parameter offload cpu, bf16; CUDA); lmforge sets optimizer: DeepSpeedCPUAdam in AdamW mode "
                             "(optimizer offload) with lmforge's parameter groups, from its optimizer's values")
    assert engine.endswith("scheduler dropped (lmforge sets the learning rate each step)") and "\n" not in engine
    monkeypatch.setenv("LMFORGE_DEEPSPEED_ENGINE", "0")
    assert "DeepSpeed's engine is not used: LMFORGE_DEEPSPEED_ENGINE=0" in deepspeed_notice(GUIDE, 1)
    monkeypatch.delenv("LMFORGE_DEEPSPEED_ENGINE")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "DeepSpeed's engine is not used: no CUDA device (set LMFORGE_DEEPSPEED_ENGINE=1 to run it on the cpu)" \
        in deepspeed_notice(GUIDE, 1)
    monkeypatch.setenv("LMFORGE_DEEPSPEED_ENGINE", "1")
    assert "runs on DeepSpeed's engine (ZeRO-3, optimizer offload cpu, parameter offload cpu, bf16; " \
           "LMFORGE_DEEPSPEED_ENGINE=1 on cpu)" in deepspeed_notice(GUIDE, 1)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "deepspeed" else real_find_spec(n, *a))
    assert "DeepSpeed's engine is not used: DeepSpeed is not installed" in deepspeed_notice(GUIDE, 1)


@pytest.mark.parametrize("stage,expected", [
    (0, {"parallel": "ddp"}), (1, {"parallel": "ddp"}),
    (2, {"parallel": "fsdp", "reshard_after_forward": False}), (3, {"parallel": "fsdp"}),
])
def test_zero_stages(stage, expected):
    assert map_ds_config({"zero_optimization": {"stage": stage}})[0] == expected


def test_auto_values_keep_ours():
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
          "gradient_clipping": "auto", "bf16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "weight_decay": "auto"}}}
    overrides, mapped, not_mapped = map_ds_config(ds)
    assert overrides == {} and not_mapped == []
    assert sum("auto -> ours" in m for m in mapped) == 8


def test_train_batch_size_is_split_or_checked_over_the_processes():
    assert map_ds_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, world_size=2)[0] == \
        {"micro_batch_size": 2, "grad_accum": 4}
    assert map_ds_config({"train_batch_size": 16}, world_size=4)[0] == {"micro_batch_size": 4, "grad_accum": 1}
    assert map_ds_config({"train_batch_size": 16, "gradient_accumulation_steps": 2}, world_size=2)[0] == \
        {"micro_batch_size": 4, "grad_accum": 2}
    with pytest.raises(ConfigError, match="train_batch_size 16 is not a multiple of 3 x 2 processes"):
        map_ds_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 3}, world_size=2)
    with pytest.raises(ConfigError, match='train_batch_size 16 cannot be split with an "auto" micro-batch'):
        map_ds_config({"train_batch_size": 16, "gradient_accumulation_steps": "auto"})
    with pytest.raises(ConfigError, match="train_batch_size 16 != train_micro_batch_size_per_gpu 2 x "
                                          "gradient_accumulation_steps 4 x 1 processes"):
        map_ds_config({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4})


def test_warmup_schedulers():
    def mapped(kind, **params):
        return map_ds_config({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                              "scheduler": {"type": kind, "params": {"warmup_type": "linear", **params}}})[0]

    assert mapped("WarmupLR", warmup_num_steps=50) == {"lr": 1e-3, "schedule": "constant", "warmup_steps": 50}
    assert mapped("WarmupCosineLR", warmup_num_steps=5, total_num_steps=90, cos_min_ratio=0.1) == \
        {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 5, "decay_steps": 90, "min_lr": pytest.approx(1e-4)}


@pytest.mark.parametrize("ds,message", [
    ({"zero_optimization": {"stage": 4}}, r"zero_optimization.stage must be 0, 1, 2 or 3 \(got 4\)"),
    ({"zero_optimization": {"stage": "three"}}, "zero_optimization.stage must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/nvme"}}},
     "zero_optimization.offload_param.device=nvme has no FSDP2 equivalent"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
     "offload_optimizer.device=cpu needs zero_optimization.stage 2 or 3"),
    ({"zero_optimization": "yes"}, "zero_optimization must be a mapping"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bf16 and fp16 are both enabled"),
    ({"optimizer": {"type": "Lamb"}}, "optimizer.type='Lamb' has no equivalent"),
    ({"optimizer": {"type": "Adam", "params": {"adam_w_mode": False}}}, "adam_w_mode=false"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": 0.9}}}, r"optimizer.params.betas must be \[beta1, beta2\]"),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type='OneCycle' has no equivalent"),
    ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an integer >= 1"),
    ({"gradient_clipping": "high"}, "gradient_clipping must be a number"),
])
def test_bad_ds_configs_are_one_line_errors(ds, message):
    with pytest.raises(ConfigError, match=message) as err:
        map_ds_config(ds)
    assert str(err.value).startswith("deepspeed: ") and "\n" not in str(err.value)


def test_unreadable_ds_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"deepspeed: cannot read .*missing.json \(No such file"):
        load_ds_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}\n}')
    with pytest.raises(ConfigError, match=r"deepspeed: .*bad.json:1: not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="the top level must be a JSON object"):
        load_ds_config(tmp_path / "list.json")


def test_explicit_train_keys_must_agree_with_the_ds_config(char_shards, tmp_path):
    base = [f"data.dir={char_shards}", f"deepspeed={GUIDE}"]
    with pytest.raises(ConfigError, match=r"train.grad_accum=8 conflicts with deepspeed .*ds_zero3_offload.json "
                                          r"\(which maps to 4\)"):
        load_config(PretrainConfig, None, [*base, "train.grad_accum=8"])
    cfg = load_config(PretrainConfig, None, [*base, "train.grad_accum=4", "train.max_steps=7"])
    assert (cfg.train.grad_accum, cfg.train.max_steps, cfg.train.cpu_offload) == (4, 7, True)
    # The written config (ds_config plus the mapped train keys) loads again to the same config.
    again = PretrainConfig.model_validate(cfg.model_dump(mode="json"))
    assert again == cfg
    # Built in Python: only the keys a TrainConfig was given count as explicit.
    built = PretrainConfig(data={"dir": char_shards}, train=TrainConfig(max_steps=5), deepspeed=str(GUIDE))
    assert (built.train.max_steps, built.train.grad_accum) == (5, 4)
    with pytest.raises(Exception, match="train.parallel=ddp conflicts"):
        PretrainConfig(data={"dir": char_shards}, train=TrainConfig(parallel="ddp"), deepspeed=str(GUIDE))


def test_inline_ds_config_on_finetune(tmp_path):
    from lmforge.train.config import FinetuneConfig

    (tmp_path / "sft.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    cfg = FinetuneConfig.model_validate({"base_model": "m", "data": {"path": str(tmp_path / "sft.jsonl")},
                                         "deepspeed": {"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}})
    assert (cfg.train.parallel, cfg.train.grad_clip) == ("fsdp", 0.5)
