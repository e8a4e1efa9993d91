"""`lmforge plan memory`: the CLI (table, --json, fits and the cheapest fix, the guide's 70B rows, one-line errors),
and the estimates checked against the peak of live tensor memory measured in real training steps on CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import require
from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.model.config import ModelConfig
from lmforge.model.memory import GB, ModelShape, TrainSetup, quantized_bytes, training_memory
from lmforge.train.config import FinetuneConfig, TrainConfig

SMALL = dict(vocab_size=1024, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=352,
             max_seq_len=64)


def plan_json(capsys, *args) -> dict:
    assert main(["plan", "memory", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_presets_are_planned_from_formulas_without_torch():
    code = ("import sys; from lmforge.cli import main; "
            "main(['plan', 'memory', 'configs/pretrain/1b.yaml', '--device', 'h100-80gb', '--gpus', '8']); "
            "main(['plan', 'memory', '--model', '70b', '--method', 'qlora', '--device', 'h100-80gb']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "h100-80gb: fits" in out.stdout and "guide: 70B qlora = 40 GB" in out.stdout


def test_json_has_every_device_and_the_verdict(capsys):
    rep = plan_json(capsys, "configs/pretrain/1b.yaml", "--device", "h100-80gb", "--gpus", "8")
    assert set(rep["devices"]) == {"a100-40gb", "a100-80gb", "h100-80gb", "h200-141gb", "l4-24gb", "rtx4090-24gb",
                                   "cpu"}
    row = rep["devices"]["h100-80gb"]
    for key in ("weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "kv_cache_gb", "total_gb"):
        assert key in row
    assert rep["fits"] is True and rep["suggestion"] is None
    # FSDP over 8: a 1.1 B model's 16 B/param of fp32 state, sharded
    assert row["weights_gb"] + row["grads_gb"] + row["optimizer_gb"] == pytest.approx(16 * rep["params"] / 8 / GB,
                                                                                      rel=1e-3)
    small = plan_json(capsys, "configs/pretrain/1b.yaml", "--device", "l4-24gb", "--gpus", "8")
    assert small["fits"] is False and "micro_batch_size=" in small["suggestion"]


def test_the_cheapest_fix_is_a_change_that_fits(capsys):
    rep = plan_json(capsys, "--model", "7b", "--method", "full", "--device", "a100-80gb")
    assert rep["fits"] is False and rep["suggestion"]
    fixed = plan_json(capsys, "--model", "7b", "--method", "full", "--device", "a100-80gb",
                      *_as_args(rep["suggestion"]))
    assert fixed["fits"] is True


def _as_args(suggestion: str) -> list[str]:
    """A suggestion's words as command-line arguments (`(same global batch)` is prose)."""
    return [w for w in suggestion.split(" (")[0].split()]


def test_guide_70b_rows_and_what_they_leave_out(capsys):
    n = plan_json(capsys, "--model", "70b", "--method", "full")["params"]
    rows = {m: plan_json(capsys, "--model", "70b", "--method", m, "--device", "h100-80gb",
                         "train.micro_batch_size=1", "train.grad_checkpointing=true")["devices"]["h100-80gb"]
            for m in ("full", "lora", "qlora")}
    assert rows["full"]["optimizer_gb"] == pytest.approx(8 * n / GB, rel=1e-3)  # what the guide's 280 GB omits
    assert rows["full"]["total_gb"] > 4 * 280
    assert rows["lora"]["weights_gb"] == pytest.approx(2 * n / GB, rel=0.01)  # the guide's 140 GB of bf16 base
    assert 145 <= rows["lora"]["total_gb"] <= 145 * 1.10
    assert 40 <= rows["qlora"]["total_gb"] <= 40 * 1.15
    assert main(["plan", "memory", "--model", "70b", "--method", "lora"]) == 0
    assert "The guide leaves out activations" in capsys.readouterr().out


def test_quantisation_constants():
    n = 64 * 256 * 10
    assert quantized_bytes(n, double_quant=False) == n / 2 + n / 64 * 4  # 0.5 bit per parameter of fp32 absmax
    assert quantized_bytes(n, double_quant=True) == n / 2 + n / 64 + n / 64 / 256 * 4  # ~0.127 bit


def test_serving_kv_cache(capsys):
    rep = plan_json(capsys, "--model", "7b", "--max-batch", "8", "--max-model-len", "4096", "--device", "l4-24gb")
    row = rep["devices"]["l4-24gb"]
    # K and V x 32 layers x 32 kv heads x 128 x 4096 tokens x 8 sequences x 2 bytes (bf16)
    assert row["kv_cache_gb"] == pytest.approx(2 * 32 * 32 * 128 * 4096 * 8 * 2 / GB, rel=1e-3)
    assert rep["fits"] is False and rep["suggestion"].startswith("--max-batch")


@pytest.mark.parametrize("args, message", [
    (["--model", "7b", "--device", "tpu-v9"], "unknown device"),
    (["configs/pretrain/1b.yaml", "train.no_such_key=1"], "train.no_such_key: unknown key"),
    (["configs/pretrain/1b.yaml", "nonsense=1"], "nonsense: unknown key"),
    (["missing.yaml"], "missing.yaml does not exist"),
    (["--model", "no-such-model"], "no-such-model"),
])
def test_bad_input_is_one_line(capsys, args, message):
    assert main(["plan", "memory", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


# ---- estimates against measured peaks ------------------------------------------------------------------------------

def _ratio(estimate, measured: dict) -> float:
    return estimate.tensors / measured["peak"]


@pytest.mark.parametrize("precision, checkpointing", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_pretrain_estimate_matches_measured_peak(precision, checkpointing):
    from lmforge.plan.measure import measure_pretrain

    mc = ModelConfig(preset=None, tie_embeddings=True, **SMALL)
    tc = TrainConfig(micro_batch_size=2, precision=precision, device="cpu", threads=1,
                     grad_checkpointing=checkpointing)
    measured = measure_pretrain(mc, tc)
    setup = TrainSetup(micro_batch=2, seq_len=64, precision=precision, grad_checkpointing=checkpointing,
                       attention="sdpa" if precision == "fp32" else "eager", cuda=False)
    assert abs(_ratio(training_memory(ModelShape.from_config(mc), setup), measured) - 1) < 0.10


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """A small random HF Llama directory and a one-record dataset (the config needs a data path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("hf_base")
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    (d / "data.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    return d


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_finetune_estimate_matches_measured_peak(hf_base, method):
    from lmforge.plan.measure import measure_finetune

    if method == "qlora":
        require("bitsandbytes", why="QLoRA's 4-bit base")
    cfg = FinetuneConfig(base_model=str(hf_base / "model"), method=method, data={"path": str(hf_base / "data.jsonl")},
                         train={"micro_batch_size": 2, "precision": "bf16", "device": "cpu", "threads": 1})
    measured = measure_finetune(cfg, seq_len=64)
    shape = ModelShape.from_hf(json.loads((hf_base / "model" / "config.json").read_text()))
    setup = TrainSetup(method=method, micro_batch=2, seq_len=64, precision="bf16", impl="hf", cuda=False)
    assert abs(_ratio(training_memory(shape, setup), measured) - 1) < 0.10


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_estimate_matches_measured_peak(parallel):
    from lmforge.plan.measure import measure_pretrain_ranks

    mc = ModelConfig(preset=None, tie_embeddings=False, **SMALL)
    tc = TrainConfig(micro_batch_size=2, precision="bf16", device="cpu", threads=1, parallel=parallel)
    ranks = measure_pretrain_ranks(mc, tc, world=2)
    setup = TrainSetup(micro_batch=2, seq_len=64, precision="bf16", attention="eager", parallel=parallel,
                       world_size=2, cuda=False)
    estimate = training_memory(ModelShape.from_config(mc), setup)
    assert len(ranks) == 2
    for measured in ranks:
        assert abs(_ratio(estimate, measured) - 1) < 0.10


# ---- train.auto_micro_batch ----------------------------------------------------------------------------------------

def test_fit_micro_batch_keeps_the_windows_per_step():
    from lmforge.model.memory import fit_micro_batch

    shape = ModelShape.from_config(ModelConfig(preset="124m", vocab_size=50304))
    setup = TrainSetup(micro_batch=16, grad_accum=2, seq_len=1024, cuda=True)
    at = {mb: training_memory(shape, TrainSetup(micro_batch=mb, grad_accum=32 // mb, seq_len=1024)).total
          for mb in (4, 8)}
    assert fit_micro_batch(shape, setup, (at[4] + at[8]) / 2) == (4, 8)
    assert fit_micro_batch(shape, setup, 1e15) == (32, 1)
    with pytest.raises(UserError, match="auto_micro_batch"):
        fit_micro_batch(shape, setup, 1e6)


def test_pretrain_auto_micro_batch_writes_the_sizes_it_chose(char_shards, tmp_path, monkeypatch):
    import yaml

    from conftest import TINY
    from lmforge.model import memory

    shape = ModelShape.from_config(ModelConfig(preset="tiny", max_seq_len=32, vocab_size=65))
    # A "device" with room for a micro-batch of 2 windows of 32 tokens, not 4 (this machine's RAM, shrunk).
    room = training_memory(shape, TrainSetup(micro_batch=2, grad_accum=4, seq_len=32, precision="fp32",
                                             cuda=False)).total * 1.01
    monkeypatch.setattr(memory.os, "sysconf", lambda name: room if name == "SC_PAGE_SIZE" else 1)
    out = tmp_path / "run"
    assert main(["pretrain", f"data.dir={char_shards}", f"out_dir={out}", *TINY, "train.max_steps=2",
                 "train.precision=fp32", "train.micro_batch_size=8", "train.auto_micro_batch=true"]) == 0
    written = yaml.safe_load((out / "config.yaml").read_text())["train"]
    assert (written["micro_batch_size"], written["grad_accum"]) == (2, 4)


def test_the_example_plan_config(capsys):
    rep = plan_json(capsys, "configs/plan/70b-qlora-h100.yaml")
    assert rep["device"] == "h100-80gb" and rep["fits"] is True
    assert rep["setup"]["seq_len"] == 4096 and rep["setup"]["grad_accum"] == 16
    assert rep["devices"]["a100-40gb"]["fits"] is False
