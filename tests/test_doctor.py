"""lmforge doctor: faults planted in real short runs and in synthetic metrics are found; a healthy run stays quiet."""
from __future__ import annotations

import json
import random
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import TINY, read_metrics, run_cli
from lmforge.config import load_config
from lmforge.doctor import DoctorConfig, DoctorError, diagnose, doctor, read_run, run_doctor
from lmforge.train.config import PretrainConfig
from lmforge.train.pretrain import pretrain


def train(shards: Path, out: Path, *extra: str) -> Path:
    """A real tiny pretraining run (char tokenizer, 32-token windows) into `out`."""
    from lmforge.train.guards import TrainingStopped
    try:
        pretrain(load_config(PretrainConfig, None, [f"data.dir={shards}", f"out_dir={out}", "resume=never", *TINY,
                                                    *extra]))
    except TrainingStopped:
        pass  # a planted fault may stop the run; its metrics are what doctor reads
    return out


def codes(run_dir: Path) -> dict[str, str]:
    """{finding code: severity} for one run."""
    return {f.code: f.severity for f in diagnose(read_run(run_dir))}


@pytest.fixture(scope="module")
def healthy(char_shards, tmp_path_factory) -> Path:
    return train(char_shards, tmp_path_factory.mktemp("doctor") / "healthy", "train.max_steps=40",
                 "train.eval_every=10")


@pytest.fixture(scope="module")
def diverged(char_shards, tmp_path_factory) -> Path:
    return train(char_shards, tmp_path_factory.mktemp("doctor") / "diverged", "train.max_steps=40", "train.lr=1",
                 "train.eval_every=10")


def test_healthy_run_has_no_findings_and_exits_0(healthy, tmp_path):
    assert codes(healthy) == {}
    proc = run_cli("doctor", str(healthy), "--out", str(tmp_path))
    assert "no findings" in proc.stdout
    assert (tmp_path / "doctor.md").read_text().count("No findings.") == 1
    assert (tmp_path / "doctor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any("gpu_util" in r for r in read_metrics(healthy))  # CPU runs log no NVML readings


def test_lr_1_diverges_critical_and_exit_1(diverged, healthy, tmp_path):
    found = codes(diverged)
    assert found["loss_diverged"] == "critical" and found["lr_too_high"] == "warning"
    assert "loss_plateau" not in found and "overfitting" not in found  # val never improved: not overfitting
    # Several runs: one report overlaying them, written to --out; the critical one gates the exit status.
    assert run_doctor(DoctorConfig(runs=[healthy, diverged], out=tmp_path)) == 1
    md = (tmp_path / "doctor.md").read_text()
    assert str(healthy) in md and str(diverged) in md and "CRITICAL: loss diverged" in md
    assert (tmp_path / "doctor.png").is_file() and not (healthy / "doctor.md").exists()


def test_lr_1e9_plateaus_with_its_cause_and_decoded_samples(char_shards, tmp_path):
    run = train(char_shards, tmp_path / "flat", "train.max_steps=30", "train.lr=1e-9", "train.min_lr=0")
    finding = next(f for f in diagnose(read_run(run)) if f.code == "loss_plateau")
    assert finding.severity == "critical" and "LR too low" in finding.evidence
    assert len(finding.samples) == 3 and all(len(s) == 32 for s in finding.samples)
    assert any(w in " ".join(finding.samples) for w in ("king", "lord", "queen", "fool", "the"))
    proc = run_cli("doctor", str(run), check=False)
    assert proc.returncode == 1 and "CRITICAL" in proc.stdout and "sample: " in proc.stdout


def test_small_corpus_trained_many_epochs_overfits(tmp_path):
    from lmforge.tokens.shards import write_shards

    rng = random.Random(0)
    words = "the king a fool my lord queen speaks goes laughs weeps in hall to field at gate by sea".split()
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(8))}) + "\n"
                            for _ in range(20)))
    write_shards(docs, "char", tmp_path / "shards", val_fraction=0.2)
    run = train(tmp_path / "shards", tmp_path / "over", "train.max_steps=300", "train.lr=1e-2", "train.min_lr=1e-3",
                "train.warmup_steps=10", "train.eval_every=25", "train.weight_decay=0")
    found = codes(run)
    assert found.get("overfitting") == "warning" and found.get("data_repetition") == "warning", found
    assert "critical" not in found.values()
    assert run_doctor(DoctorConfig(runs=[run])) == 0
    assert run_doctor(DoctorConfig(runs=[run], fail_on="warning")) == 1


def test_nan_skips_oom_backoff_rollback_and_stop_events(char_shards, tmp_path):
    skipped = train(char_shards, tmp_path / "skip", "train.max_steps=12", "guards.debug_nan_steps=[7]",
                    "guards.debug_oom_steps=[3]", "train.precision=fp32")
    found = codes(skipped)
    assert found.get("skip_nonfinite") == "warning" and found.get("oom") == "warning", found
    assert "critical" not in found.values()
    stopped = train(char_shards, tmp_path / "stop", "train.max_steps=30", "train.ckpt_every=10",
                    "guards.debug_nan_steps=[13, 14]", "guards.max_bad_steps=2", "guards.max_rollbacks=1")
    found = codes(stopped)
    assert found.get("rollback") == "warning" and found.get("stop") == "critical", found


# ---- synthetic metrics --------------------------------------------------------------------------------

def write_run(path: Path, lines: list[dict], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def steps(n: int, **series) -> list[dict]:
    """Train lines 1..n; each keyword is a function of the step giving that key's value."""
    base = {"loss": lambda s: 3.0 * 0.99 ** s + 1.0, "lr": lambda s: 1e-3 * min(1, s / 5),
            "grad_norm": lambda s: 1.0, "tokens_per_sec": lambda s: 10_000.0, "elapsed_s": lambda s: s * 0.5,
            "tokens": lambda s: 128 * s}
    base.update(series)
    return [{"step": s, **{k: f(s) for k, f in base.items()}} for s in range(1, n + 1)]


PRETRAIN = {"data": {"dir": None}, "model": {"preset": "tiny"}, "train": {"warmup_steps": 5, "grad_clip": 1.0}}


def test_synthetic_healthy_curve_is_quiet(tmp_path):
    assert codes(write_run(tmp_path / "ok", steps(200), PRETRAIN)) == {}


def test_throughput_drop_low_mfu_and_gpu_util(tmp_path):
    run = write_run(tmp_path / "slow", steps(200, tokens_per_sec=lambda s: 10_000.0 if s <= 120 else 3_000.0,
                                             mfu=lambda s: 0.08, gpu_util=lambda s: 35.0), PRETRAIN)
    found = diagnose(read_run(run))
    drop = next(f for f in found if f.code == "throughput_drop")
    assert drop.steps[0] >= 120 and "3000" in drop.evidence
    assert {"low_mfu", "low_gpu_util"} <= {f.code for f in found}
    short = write_run(tmp_path / "blip", steps(200, tokens_per_sec=lambda s: 3_000.0 if 100 < s <= 110 else 10_000.0,
                                               elapsed_s=lambda s: s * 0.01), PRETRAIN)
    assert "throughput_drop" not in codes(short)  # 0.1 s of slowness is noise, not a finding


def test_overfitting_found_when_train_lines_are_sparse(tmp_path):
    lines = [r for r in steps(400) if r["step"] % 10 == 0]  # log_every 10
    lines += [{"step": s, "val_loss": 2.0 - s / 400 if s <= 200 else 1.5 + (s - 200) / 400} for s in range(0, 401, 50)]
    found = {f.code: f for f in diagnose(read_run(write_run(tmp_path / "sparse", lines, PRETRAIN)))}
    assert list(found) == ["overfitting"] and found["overfitting"].steps == (200, 400)


def test_spike_grad_growth_no_warmup_and_tight_clipping(tmp_path):
    spiky = write_run(tmp_path / "spike", steps(100, loss=lambda s: 9.0 if s == 60 else 3.0 * 0.99 ** s + 1.0),
                      PRETRAIN)
    assert codes(spiky) == {"loss_spikes": "warning"}
    growing = write_run(tmp_path / "grow", steps(100, grad_norm=lambda s: 0.5 * 1.08 ** s), PRETRAIN)
    assert codes(growing) == {"grad_norm_growth": "warning"}
    cold = write_run(tmp_path / "cold", steps(100, lr=lambda s: 1e-3),
                     {**PRETRAIN, "train": {"warmup_steps": 0, "grad_clip": 1.0}})
    assert codes(cold) == {"no_warmup": "warning"}
    clipped = write_run(tmp_path / "clip", steps(100, loss=lambda s: 3.0, grad_norm=lambda s: 50.0),
                        {**PRETRAIN, "train": {"warmup_steps": 5, "grad_clip": 0.5}})
    plateau = next(f for f in diagnose(read_run(clipped)) if f.code == "loss_plateau")
    assert "clipping too tight" in plateau.evidence and "100x" in plateau.evidence


def test_lr_range_follows_the_model_size_in_the_checkpoint(tmp_path):
    smollm2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True}
    for lr, want in ((5e-2, {"lr_too_high": "warning"}), (2e-4, {})):
        run = write_run(tmp_path / f"ft-{lr}", steps(30, lr=lambda s: lr * min(1, s / 5)),
                        {"base_model": "x", "method": "full", "train": {"warmup_steps": 5}})
        (run / "checkpoints" / "step-0000030").mkdir(parents=True)
        (run / "checkpoints" / "step-0000030" / "config.json").write_text(json.dumps(smollm2))
        (run / "checkpoints" / "latest").write_text("step-0000030\n")
        found = diagnose(read_run(run))
        assert {f.code: f.severity for f in found} == want
        assert all("for a 134M-parameter model (finetune, full)" in f.evidence for f in found)


def test_plateau_names_a_dominant_token_in_the_shards(tmp_path):
    from lmforge.tokens.shards import write_shards

    (tmp_path / "pad.txt").write_text("~" * 3000 + "the end\n")
    write_shards(tmp_path / "pad.txt", "char", tmp_path / "shards")
    run = write_run(tmp_path / "run", steps(60, loss=lambda s: 2.0),
                    {**PRETRAIN, "data": {"dir": str(tmp_path / "shards")}, "model": {"max_seq_len": 16}})
    plateau = next(f for f in diagnose(read_run(run)) if f.code == "loss_plateau")
    assert "one token ('~') is 100 % of the sampled tokens" in plateau.evidence and plateau.samples == ["~" * 16] * 3


DPO = {"algorithm": "dpo", "method": "lora", "base_model": "x", "train": {"warmup_steps": 5}}
GRPO = {"algorithm": "grpo", "method": "lora", "base_model": "x", "train": {"warmup_steps": 5}}


def test_dpo_accuracy_at_chance_or_zero_is_critical_learning_is_quiet(tmp_path):
    stuck = write_run(tmp_path / "stuck", steps(60, loss=lambda s: 0.693,
                                                 **{"rewards/accuracies": lambda s: 0.5 + 0.02 * (-1) ** s}), DPO)
    found = codes(stuck)
    assert found["accuracy_stuck"] == "critical" and found["loss_plateau"] == "warning"  # tuned weights: may be flat
    tied = write_run(tmp_path / "tied", steps(60, loss=lambda s: 0.693, **{"rewards/accuracies": lambda s: 0.0}), DPO)
    stuck_at_0 = next(f for f in diagnose(read_run(tied)) if f.code == "accuracy_stuck")
    assert "stuck at 0" in stuck_at_0.title and "score the same" in stuck_at_0.evidence
    learning = write_run(tmp_path / "learns", steps(60, loss=lambda s: 0.693 * 0.98 ** s,
                                                    **{"rewards/accuracies": lambda s: min(0.95, 0.5 + s / 50)}), DPO)
    assert codes(learning) == {}
    cold = write_run(tmp_path / "cold", steps(60, loss=lambda s: 0.693 * 0.98 ** s),
                     {**DPO, "train": {"warmup_steps": 0}})
    assert codes(cold) == {"no_warmup": "info"}  # tuning from trained weights: worth a note, not a warning


def test_grpo_zero_variance_groups_and_reward_hacking(tmp_path):
    flat = write_run(tmp_path / "flat", steps(40, frac_reward_zero_std=lambda s: 1.0, reward=lambda s: 0.0), GRPO)
    assert codes(flat) == {"zero_std_groups": "critical"}
    mostly = write_run(tmp_path / "mostly", steps(40, frac_reward_zero_std=lambda s: 0.75), GRPO)
    assert codes(mostly) == {"zero_std_groups": "warning"}
    hacked = write_run(tmp_path / "hacked", steps(40, reward=lambda s: s / 40, kl=lambda s: 0.01 * 1.15 ** s,
                                                  frac_reward_zero_std=lambda s: 0.1), GRPO)
    assert codes(hacked) == {"reward_hacking": "warning"}
    calm = write_run(tmp_path / "calm", steps(40, reward=lambda s: s / 40, kl=lambda s: 0.02 + s / 4000,
                                                frac_reward_zero_std=lambda s: 0.1), GRPO)
    assert codes(calm) == {}
    ppo = write_run(tmp_path / "ppo", steps(40, **{"objective/kl": lambda s: 0.5 * 1.15 ** s,
                                                   "objective/scores": lambda s: 1.0}),
                    {**GRPO, "algorithm": "ppo"})
    assert codes(ppo) == {"kl_exploding": "warning"}


def test_bad_input_is_one_line_and_unreadable_lines_are_counted(tmp_path):
    proc = run_cli("doctor", str(tmp_path), check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no metrics.jsonl" in proc.stderr
    proc = run_cli("doctor", str(tmp_path / "missing"), check=False)
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    (tmp_path / "metrics.jsonl").write_text("garbage\n[1, 2]\n")
    with pytest.raises(DoctorError, match="no readable metrics lines .2 unreadable: lines 1, 2"):
        read_run(tmp_path)
    lines = [json.dumps(r) for r in steps(30)]
    lines[3], lines[9] = '{"step": 4, "loss": 2.', "not json"
    run = tmp_path / "torn"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    found = {f.code: f for f in diagnose(read_run(run))}
    assert "2 unreadable" in found["unreadable_lines"].title and "lines 4, 10" in found["unreadable_lines"].evidence
    assert found["no_config"].severity == "info"
    runs, written = doctor(DoctorConfig(runs=[run]))
    assert [p.name for p in written] == ["doctor.md", "doctor.png"]


def test_nvml_readings_join_train_lines_on_cuda(tmp_path, monkeypatch):
    """No GPU here: a fake pynvml stands in for the driver, and CUDA is reported as in use."""
    import torch

    from lmforge.train import metrics

    class NVMLError(Exception):
        pass

    calls = []
    fake = types.SimpleNamespace(
        NVMLError=NVMLError, nvmlInit=lambda: calls.append("init"),
        nvmlDeviceGetHandleByIndex=lambda i: calls.append(("index", i)) or f"h{i}",
        nvmlDeviceGetHandleByUUID=lambda u: calls.append(("uuid", u)) or u,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=12.5e9, total=80e9),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")

    def log_one(out: Path) -> list[dict]:
        out.mkdir()
        logger = metrics.MetricsLogger(out, True, 10, 0, False, False, "", {}, False)
        logger.train({"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_sec": 1.0})
        logger.close()
        return read_metrics(out)

    line = log_one(tmp_path / "a")[0]
    assert line["gpu_mem_gb"] == 12.5 and line["gpu_util"] == 87.0
    assert ("index", 5) in calls  # CUDA device 1 is the second visible GPU, NVML's 5

    def broken():
        raise NVMLError("driver not loaded")
    monkeypatch.setattr(fake, "nvmlInit", broken)
    records = log_one(tmp_path / "b")
    assert records[0]["event"] == "nvml_unavailable" and "driver not loaded" in records[0]["detail"]
    assert "gpu_util" not in records[1]
