"""The pretraining engine end to end: learning, checkpoints, exact resume, guards, config errors."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, events, kill_after_checkpoint, read_metrics, run_cli, step_losses
from lmforge.config import ConfigError, load_config
from lmforge.train.config import PretrainConfig
from lmforge.train.pretrain import pretrain


def cfg_for(shards: Path, out: Path, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, None, [f"data.dir={shards}", f"out_dir={out}", *TINY, *extra])


def test_loss_falls_and_every_checkpoint_loads_in_transformers(char_shards, tmp_path):
    s = pretrain(cfg_for(char_shards, tmp_path / "run", "train.max_steps=60", "train.eval_every=30",
                         "train.ckpt_every=30", "train.keep_last=5"))
    assert s["last_val"][0] < s["first_val"][0] - 0.5, s
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000030", "step-0000060"]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000060"
    assert (tmp_path / "run" / "config.yaml").is_file()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.model.config import ModelConfig
    from lmforge.model.llama import LeanLlama, hf_to_lean
    from safetensors.torch import load_file
    for ckpt in ckpts:
        hf = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        tok = AutoTokenizer.from_pretrained(ckpt)
        ids = torch.tensor([tok.encode("The king ")])
        out = hf.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8
        # Our module and transformers' compute the same function from the same files.
        cfg = ModelConfig(preset="tiny", max_seq_len=32, vocab_size=hf.config.vocab_size)
        lean = LeanLlama(cfg).eval()
        lean.load_state_dict(hf_to_lean(load_file(str(ckpt / "model.safetensors")), cfg))
        with torch.no_grad():
            assert torch.allclose(lean(ids), hf(ids).logits, atol=1e-4)

    records = read_metrics(tmp_path / "run")
    train_lines = [r for r in records if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s", "mem_gb"} <= set(train_lines[0])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 30, 60]


def test_killed_run_resumes_with_identical_losses(char_shards, tmp_path):
    args = ["pretrain", f"data.dir={char_shards}", *TINY, "train.max_steps=40", "train.ckpt_every=5",
            "train.precision=fp32", "train.eval_every=20"]
    run_cli(*args, f"out_dir={tmp_path / 'full'}")
    reference = step_losses(tmp_path / "full")

    out = tmp_path / "killed"
    kill_after_checkpoint(args, out, "step-0000015", timeout=120)
    latest = out / "checkpoints" / "latest"
    named = latest.read_text().strip()
    assert (out / "checkpoints" / named / "trainer_state.pt").is_file()
    resumed_from = int(named.split("-")[1])
    assert resumed_from < 40

    run_cli(*args, f"out_dir={out}")
    assert [e for e in events(out) if e["event"] == "resumed"]
    resumed = step_losses(out)
    assert [s for s in resumed if s > resumed_from] == list(range(resumed_from + 1, 41))
    for s in range(resumed_from + 1, 41):
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_nan_batch_is_skipped_and_training_goes_on(char_shards, tmp_path):
    s = pretrain(cfg_for(char_shards, tmp_path / "run", "train.max_steps=20", "guards.debug_nan_steps=[7]"))
    skips = [e for e in events(tmp_path / "run") if e["event"] == "skip_nonfinite"]
    assert [e["step"] for e in skips] == [7]
    assert s["steps"] == 20 and s["train_loss"] == s["train_loss"]  # finite, not NaN
    losses = step_losses(tmp_path / "run")
    assert losses[7] != losses[7] and all(losses[i] == losses[i] for i in range(8, 21))  # NaN only at 7
    assert s["last_val"][0] < 3.0  # learned: ln(66) = 4.19 at the start


def test_repeated_bad_steps_roll_back_then_stop(char_shards, tmp_path):
    from lmforge.train.guards import TrainingStopped
    cfg = cfg_for(char_shards, tmp_path / "run", "train.max_steps=30", "train.ckpt_every=10",
                  "guards.debug_nan_steps=[13, 14]", "guards.max_bad_steps=2", "guards.max_rollbacks=1")
    with pytest.raises(TrainingStopped, match="bad steps in a row"):
        pretrain(cfg)
    names = [e["event"] for e in events(tmp_path / "run")]
    assert names.count("rollback") == 1 and names.index("rollback") < len(names) - 1
    rollback = next(e for e in events(tmp_path / "run") if e["event"] == "rollback")
    assert rollback["step"] == 10 and "x0.5" in rollback["detail"]
    assert names[-1] == "stop"


def test_oom_halves_micro_batch_keeping_the_global_batch(char_shards, tmp_path):
    common = ["train.max_steps=6", "train.precision=fp32", "train.micro_batch_size=4"]  # OOM at step 3
    pretrain(cfg_for(char_shards, tmp_path / "ref", *common))
    pretrain(cfg_for(char_shards, tmp_path / "oom", *common, "guards.debug_oom_steps=[3]"))
    oom = [e for e in events(tmp_path / "oom") if e["event"] == "oom"]
    assert len(oom) == 1 and "micro_batch_size -> 2, grad_accum -> 2" in oom[0]["detail"]
    ref, got = step_losses(tmp_path / "ref"), step_losses(tmp_path / "oom")
    for s in ref:
        assert abs(ref[s] - got[s]) < 1e-5, (s, ref[s], got[s])


@pytest.mark.parametrize("override, names", [
    ("train.max_stepz=3", "train.max_stepz: unknown key"),
    ("train.max_steps=many", "train.max_steps"),
    ("train.parallel=zero", "train.parallel"),
    ("model.preset=2b", "model.preset"),
])
def test_bad_config_fails_fast_naming_the_key(char_shards, tmp_path, override, names):
    t0 = time.perf_counter()
    proc = run_cli("pretrain", f"data.dir={char_shards}", f"out_dir={tmp_path}", override, check=False)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and names in lines[0], proc.stderr
    assert elapsed < 1.5  # measured 0.26 s with interpreter start; the bound leaves room for a loaded machine
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_config_errors_in_process_are_quick(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="data.dir"):
        load_config(PretrainConfig, None, [f"data.dir={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
        load_config(PretrainConfig, tmp_path / "bad.yaml")
    assert time.perf_counter() - t0 < 1.0


def test_help_does_not_import_torch():
    code = ("import sys\nfrom lmforge.cli import main\ntry:\n    main(['pretrain', '--help'])\nexcept SystemExit:\n"
            "    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"


def test_generate_command_samples_from_a_run(char_shards, tmp_path):
    pretrain(cfg_for(char_shards, tmp_path / "run", "train.max_steps=5"))
    proc = run_cli("generate", str(tmp_path / "run"), "The ", "--max-new-tokens", "12")
    assert proc.stdout.startswith("The ") and len(proc.stdout.splitlines()[0]) >= 5


def test_pretrain_help_lists_every_config_key():
    proc = run_cli("pretrain", "--help")
    for key in ("data.dir", "model.preset", "train.max_steps", "train.micro_batch_size", "train.grad_accum",
                "train.log_every", "train.eval_every", "train.ckpt_every", "train.parallel", "guards.spike_factor"):
        assert f"  {key}  " in proc.stdout, key
    assert "none|ddp|fsdp" in proc.stdout
