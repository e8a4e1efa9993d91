"""`lmforge finetune` on a tiny Llama: LoRA, QLoRA and full SFT through the engine, masking, resume, export."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, events, kill_after_checkpoint, read_metrics, require, run_cli, step_losses

FAST = ["train.device=cpu", "train.threads=1", "train.log_every=1", "train.eval_every=0", "train.warmup_steps=2",
        "train.lr=3e-3", "train.micro_batch_size=4", "log.progress=false", "log.tensorboard=false",
        "data.val_size=16", "data.max_length=256", "lora.target_modules=all-linear"]
CONFIG = str(ROOT / "configs" / "finetune" / "smollm2-lora-alpaca.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama with a character tokenizer, saved as an HF directory, and an Alpaca-shaped dataset."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    records = []
    for _ in range(240):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        records.append({"instruction": f"add {a} and {b}", "input": "", "output": f"{a + b}"})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    from lmforge.tokens.chat import ALPACA, ALPACA_INPUT
    build_char_tokenizer(ALPACA + ALPACA_INPUT + "0123456789 add", d / "base")
    tok = AutoTokenizer.from_pretrained(d / "base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d / "base")
    return {"base": d / "base", "data": d / "data.jsonl", "dir": d}


def ft_args(tiny: dict, out: Path, *extra: str) -> list[str]:
    return ["finetune", CONFIG, f"base_model={tiny['base']}", f"data.path={tiny['data']}", f"out_dir={out}",
            *FAST, *extra]


def test_lora_lowers_heldout_loss_and_writes_a_peft_adapter(tiny, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*ft_args(tiny, out, "train.max_steps=40", "train.eval_every=20"))
    assert "trainable params: " in proc.stdout and " || trainable%: " in proc.stdout
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.2
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not (ckpt / "model.safetensors").exists()  # an adapter, not a copy of the base
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny["base"])
    train_lines = [r for r in read_metrics(out) if "loss" in r]
    assert all(r["tokens"] > 0 for r in train_lines) and train_lines[-1]["tokens"] > train_lines[0]["tokens"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = base(x).logits
        adapted = PeftModel.from_pretrained(base, ckpt)(x).logits
    assert not torch.allclose(plain, adapted, atol=1e-4)  # the adapter learned something


def test_killed_lora_run_resumes_with_identical_losses(tiny, tmp_path):
    args = [a for a in ft_args(tiny, tmp_path, "train.max_steps=30", "train.ckpt_every=5", "train.precision=fp32")
            if not a.startswith("out_dir=")]
    run_cli(*args, f"out_dir={tmp_path / 'full'}")
    reference = step_losses(tmp_path / "full")

    out = tmp_path / "killed"
    kill_after_checkpoint(args, out, "step-0000010")
    latest = out / "checkpoints" / "latest"
    resumed_from = int(latest.read_text().strip().split("-")[1])
    assert resumed_from < 30

    run_cli(*args, f"out_dir={out}")
    assert [e for e in events(out) if e["event"] == "resumed"]
    resumed = step_losses(out)
    for s in range(resumed_from + 1, 31):
        assert resumed[s] == pytest.approx(reference[s], rel=1e-6, abs=1e-7), (s, resumed[s], reference[s])


def test_no_loss_flows_from_prompt_tokens(tiny):
    """The gradient reaching the final hidden states is zero at every prompt position and nonzero at targets."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.finetune import sft_loss
    from lmforge.train.sft_data import SFTDataConfig, load_sft_data, train_batches

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    data = load_sft_data(SFTDataConfig(path=str(tiny["data"]), val_size=0), tok, seed=0)
    batch = train_batches(data, 0, False, 256, tok.eos_token_id)(0, 4, 1, 0, 1)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny["base"])
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["h"] = output

    hook = model.model.norm.register_forward_hook(keep)
    loss, n = sft_loss(model, batch)
    loss.backward()
    hook.remove()
    has_target = batch["targets"][0] != -100
    grad = captured["h"].grad[0].abs().sum(-1)
    assert n == int(has_target.sum())
    assert (grad[~has_target] == 0).all() and (grad[has_target] > 0).all()

    # The same value as cross-entropy over full logits with the prompt positions ignored.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    full = torch.nn.functional.cross_entropy(logits[0], batch["targets"][0], ignore_index=-100)
    assert full.item() == pytest.approx(loss.item(), rel=1e-5)
    assert (~has_target).sum() > has_target.sum()  # the prompts are most of the tokens: the test has teeth


def test_qlora_trains_on_cpu_with_a_smaller_model(tiny, tmp_path):
    require("bitsandbytes", why="the qlora extra (in dev)")
    lora = run_cli(*ft_args(tiny, tmp_path / "lora", "train.max_steps=3", "lora.target_modules=[q_proj,v_proj]"))
    q = run_cli(*ft_args(tiny, tmp_path / "q", "train.max_steps=12", "method=qlora",
                         "lora.target_modules=[q_proj,v_proj]", "train.eval_every=6"))
    evals = [r for r in read_metrics(tmp_path / "q") if "val_loss" in r]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]

    def model_gb(stdout: str) -> float:
        return float(stdout.split(", model ")[1].split(" MB")[0].replace(",", ""))
    assert "memory: peak RSS" in q.stdout
    assert model_gb(q.stdout) < model_gb(lora.stdout)
    ckpt = tmp_path / "q" / "checkpoints" / (tmp_path / "q" / "checkpoints" / "latest").read_text().strip()
    assert (ckpt / "adapter_model.safetensors").is_file()


def test_full_finetune_checkpoint_is_a_standalone_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    run_cli(*ft_args(tiny, out, "method=full", "train.max_steps=6", "train.ckpt_every=3", "train.lr=1e-3"))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(tiny["base"])
    x = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(model(x).logits, base(x).logits, atol=1e-5)
    assert (ckpt / "tokenizer.json").is_file()
    # and it resumes: a second run to 9 steps continues from step 6
    run_cli(*ft_args(tiny, out, "method=full", "train.max_steps=9", "train.ckpt_every=3", "train.lr=1e-3"))
    assert [e for e in events(out) if e["event"] == "resumed"]
    assert max(step_losses(out)) == 9


def test_merged_export_equals_peft_merge_and_unload(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_cli(*ft_args(tiny, out, "train.max_steps=8"))
    run_cli("export", str(out), "--merge-lora", "--out", str(tmp_path / "merged"))
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["base"]), ckpt).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    x = torch.randint(0, 40, (2, 24))
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, reference(x).logits, atol=1e-4)
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


@pytest.mark.parametrize("override, message", [
    ("base_model=/nonexistent/model", "no such model"),
    ("data.path=/nonexistent.jsonl", "data.path"),
    ("method=qlorax", "method"),
    ("lora.r=0", "lora.r"),
])
def test_bad_finetune_input_is_one_line(tiny, tmp_path, override, message):
    proc = run_cli(*ft_args(tiny, tmp_path / "bad", "train.max_steps=2"), override, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_corrupt_base_model_is_one_line(tiny, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny["base"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    proc = run_cli(*ft_args(tiny, tmp_path / "bad", "train.max_steps=2"), f"base_model={broken}", check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "broken" in err, proc.stderr


ALPACA_FILE = ROOT.parent / "shared" / "data" / "alpaca_5000.json"


@pytest.mark.slow
# ../shared/data is this machine's material, not something `make test` installs: skipping without it is right.
@pytest.mark.skipif(not ALPACA_FILE.is_file(), reason="needs ../shared/data/alpaca_5000.json")
def test_smollm2_lora_on_alpaca_lowers_heldout_loss_and_stops_with_eos(smollm2_cache, tmp_path):
    """The real model, as in the README: LoRA on Alpaca, then its answers to new Alpaca prompts end with EOS."""
    records = json.loads(ALPACA_FILE.read_text())
    (tmp_path / "train.json").write_text(json.dumps(records[:400]))
    env = {"LMFORGE_CACHE": str(smollm2_cache)}
    out = tmp_path / "run"
    run_cli("finetune", CONFIG, f"data.path={tmp_path / 'train.json'}", f"out_dir={out}", "data.val_size=16",
            "train.max_steps=16", "train.eval_every=16", "train.eval_batches=4", "train.warmup_steps=4",
            "train.lr=5e-4", "log.progress=false", "log.tensorboard=false", env=env, timeout=900)
    evals = [r for r in read_metrics(out) if "val_loss" in r]
    assert [e["step"] for e in evals] == [0, 16] and evals[1]["val_loss"] < evals[0]["val_loss"]
    short = [r for r in records[-200:] if len(r["output"]) < 120][:3]  # held out, with short reference answers
    for rec in short:
        proc = run_cli("generate", str(out), rec["instruction"], "--input", rec["input"], "--template", "alpaca",
                       "--temperature", "0", "--max-new-tokens", "200", env=env, timeout=300)
        assert "ended with EOS" in proc.stdout, proc.stdout


def test_lora_ddp_two_processes_match_one(tiny, tmp_path):
    """torchrun with 2 processes (gloo, DDP) trains the same adapter as 1 process with grad_accum=2."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1")
    common = [a for a in ft_args(tiny, tmp_path, "train.max_steps=6", "train.precision=fp32", "lora.dropout=0",
                                 "train.micro_batch_size=2") if not a.startswith(("out_dir=", "train.threads="))]

    def run(out, *launcher_and_extra, extra=()):
        cmd = [sys.executable, *launcher_and_extra, "-m", "lmforge", *common, f"out_dir={out}", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(tmp_path / "one", extra=("train.grad_accum=2",))
    run(tmp_path / "two", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        extra=("train.parallel=ddp",))
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for s in one:
        assert two[s] == pytest.approx(one[s], rel=1e-5), (s, one[s], two[s])


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_losses(tiny, tmp_path, method):
    common = ft_args(tiny, tmp_path, "train.max_steps=4", "train.precision=fp32", "lora.dropout=0", f"method={method}")
    run_cli(*common, f"out_dir={tmp_path / 'plain'}")
    run_cli(*common, f"out_dir={tmp_path / 'gc'}", "train.grad_checkpointing=true")
    plain, gc = step_losses(tmp_path / "plain"), step_losses(tmp_path / "gc")
    assert sorted(plain) == sorted(gc) == [1, 2, 3, 4]
    for s in plain:
        assert gc[s] == pytest.approx(plain[s], rel=1e-5)
    assert plain[4] != plain[1]  # training moved the model, so equal later losses mean equal updates


def test_full_finetune_on_deepspeeds_engine_trains_as_on_lmforges(tiny, tmp_path):
    """A ds_config (ZeRO-2, one process) on DeepSpeed's engine gives the losses of lmforge's engine and a
    standalone final model; LoRA keeps to lmforge's engine and the notice says so."""
    from transformers import AutoModelForCausalLM

    require("deepspeed", why="DeepSpeed's engine path (pip install -e '.[deepspeed]')")
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    engine = {"LMFORGE_DEEPSPEED_ENGINE": "1"}
    args = ("method=full", "train.max_steps=6", "train.lr=1e-3", "train.precision=fp32")
    run_cli(*ft_args(tiny, tmp_path / "ref", *args))
    proc = run_cli(*ft_args(tiny, tmp_path / "ds", *args, f"deepspeed={ds}"), env=engine)
    assert "runs on DeepSpeed's engine (ZeRO-2, precision from train.precision; LMFORGE_DEEPSPEED_ENGINE=1 on cpu)" \
        in proc.stdout
    ref, got = step_losses(tmp_path / "ref"), step_losses(tmp_path / "ds")
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert [got[s] for s in sorted(got)] == pytest.approx([ref[s] for s in sorted(ref)], abs=1e-5)
    ckpt = tmp_path / "ds" / "checkpoints" / "step-0000006"
    assert (ckpt / "tokenizer.json").is_file() and (ckpt / "deepspeed").is_dir()
    assert AutoModelForCausalLM.from_pretrained(ckpt).num_parameters() > 0

    lora = run_cli(*ft_args(tiny, tmp_path / "lora", "train.max_steps=1", f"deepspeed={ds}"), env=engine)
    assert "DeepSpeed's engine is not used: lora adapters train on lmforge's engine" in lora.stdout
