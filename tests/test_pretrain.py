"""The pretraining engine end to end: learning, checkpoints, exact resume, guards, config errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, events, kill_after_checkpoint, read_metrics, run_cli, step_losses
from lmforge.config import ConfigError, load_config
from lmforge.errors import UserError
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


def test_the_host_reads_the_device_once_per_logged_step(char_shards, tmp_path, monkeypatch):
    """Count host reads of tensors (item, tolist, float, int, bool) in the loop's parts: none in a step's
    forward/backward or update (guards on, spike median included: the skip is decided on the device), and one per
    logged step, for all the steps since the last. A read per step or micro-batch stalls a GPU's queue each time."""
    import lmforge.train.loop as loop

    reads: dict[str, list[int]] = {"forward_backward": [], "update": [], "read_steps": []}
    part = None
    for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
        def read(self, *a, _orig=getattr(torch.Tensor, name), **k):
            if part is not None:
                reads[part][-1] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, read)

    def counted(name):
        def run(*args, _orig=getattr(loop, name)):
            nonlocal part
            reads[name].append(0)
            part = name
            try:
                return _orig(*args)
            finally:
                part = None
        monkeypatch.setattr(loop, name, run)
    for name in reads:
        counted(name)

    s = pretrain(cfg_for(char_shards, tmp_path / "run", "train.max_steps=8", "train.micro_batch_size=1",
                         "train.grad_accum=4", "train.log_every=4", "train.eval_every=0", "train.ckpt_every=0",
                         "guards.spike_factor=3", "guards.spike_warmup=2"))
    assert s["steps"] == 8 and reads["forward_backward"] == [0] * 8 and reads["update"] == [0] * 8
    assert reads["read_steps"] == [1, 1]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [4, 8]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in lines if "loss" in r)


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory) -> list[Path]:
    """Three shard directories of one char tokenizer: two sharded corpora (tokenize --workers) and one train.bin."""
    from conftest import synthetic_text
    from lmforge.tokens.shards import write_sharded, write_shards

    d = tmp_path_factory.mktemp("mix")
    for i in range(4):
        (d / f"in{i}.txt").write_text(synthetic_text(30_000, seed=10 + i))
    write_sharded([d / "in0.txt", d / "in1.txt"], "char", d / "web", workers=1)
    tok = d / "web" / "tokenizer"
    write_sharded([d / "in2.txt"], tok, d / "books", workers=1)
    write_shards(d / "in3.txt", tok, d / "code")
    return [d / "web", d / "books", d / "code"]


def test_mixture_token_fractions_match_the_weights_over_1000_steps(three_sources):
    from lmforge.train.data import MixtureSampler, PretrainData, micro_batches
    from lmforge.train.config import DataConfig

    weights = {three_sources[0]: 0.5, three_sources[1]: 0.3, three_sources[2]: 0.2}
    data = PretrainData.open(DataConfig(mix=weights), None)
    sampler = data.sampler("train", 16, 8, seed=3)
    assert isinstance(sampler, MixtureSampler)
    counts = sampler.token_counts(1000)
    total = sum(counts.values())
    assert total == 1000 * 8 * 16
    for name, w in zip(("web", "books", "code"), weights.values()):
        assert abs(counts[name] / total - w) < 0.01 * w, (name, counts[name] / total, w)
    # The counts are those of the windows actually drawn, step by step.
    drawn = np.zeros(3, dtype=int)
    for step in range(1000):
        drawn += np.bincount(sampler.starts(step)[0], minlength=3)
    assert list(drawn * 16) == list(counts.values())

    # A pure function of (seed, step): a fresh sampler (a resumed run) draws the same windows, and two ranks
    # together draw exactly one rank's windows.
    again = data.sampler("train", 16, 8, seed=3)
    for step in (0, 7, 999):
        for a, b in zip(sampler.starts(step), again.starts(step)):
            assert np.array_equal(a, b)
        one = torch.cat([x for x, _ in micro_batches(sampler, step, 2, 4, 0, 1)])
        two = [list(micro_batches(again, step, 2, 2, r, 2)) for r in range(2)]
        assert torch.equal(one, torch.cat([two[r][m][0] for m in range(2) for r in range(2)]))
    assert not np.array_equal(data.sampler("train", 16, 8, seed=4).starts(5)[1], sampler.starts(5)[1])


def test_pretrain_on_a_mixture_logs_source_tokens_and_resumes_identically(three_sources, tmp_path):
    mix = "data.mix={" + ", ".join(f"{p}: {w}" for p, w in zip(three_sources, (5, 3, 2))) + "}"
    args = ["pretrain", mix, *TINY, "train.max_steps=20", "train.ckpt_every=5", "train.precision=fp32",
            "train.eval_every=10"]
    run_cli(*args, f"out_dir={tmp_path / 'full'}")
    reference = step_losses(tmp_path / "full")
    last = [r for r in read_metrics(tmp_path / "full") if "loss" in r][-1]
    per_source = {k: last[f"tokens/{k}"] for k in ("web", "books", "code")}
    assert sum(per_source.values()) == last["tokens"] == 20 * 4 * 32
    assert [round(v / last["tokens"], 1) for v in per_source.values()] == [0.5, 0.3, 0.2]
    assert [r["step"] for r in read_metrics(tmp_path / "full") if "val_loss" in r] == [0, 10, 20]

    out = tmp_path / "killed"
    kill_after_checkpoint(args, out, "step-0000010", timeout=120)
    resumed_from = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert resumed_from < 20
    run_cli(*args, f"out_dir={out}")
    resumed = step_losses(out)
    for s in range(resumed_from + 1, 21):
        assert resumed[s] == reference[s], (s, resumed[s], reference[s])
    assert [r for r in read_metrics(out) if "loss" in r][-1]["tokens/web"] == per_source["web"]


def test_a_sharded_corpus_reads_like_its_concatenation(three_sources, tmp_path):
    from lmforge.tokens.shards import load_shard, read_meta

    web = three_sources[0]
    flat = np.concatenate([np.fromfile(web / s["train"], dtype="<u2") for s in read_meta(web)["shards"]])
    (tmp_path / "flat").mkdir()
    flat.tofile(tmp_path / "flat" / "train.bin")
    from lmforge.train.data import WindowSampler
    tokens = load_shard(web, "train")
    assert len(tokens.parts) == 2 and all(isinstance(p, np.memmap) for p in tokens.parts)  # mapped, never loaded
    a = WindowSampler(tokens, 32, 8, seed=1)
    b = WindowSampler(load_shard(tmp_path / "flat", "train", vocab_size=30), 32, 8, seed=1)
    for step in range(20):
        assert torch.equal(a.batch(step, 0, 8)[0], b.batch(step, 0, 8)[0])
    s = pretrain(cfg_for(web, tmp_path / "run", "train.max_steps=3", "train.eval_every=3"))
    assert s["steps"] == 3 and s["last_val"] is not None


@pytest.mark.parametrize("mix, message", [
    ("{SRC: 1.0, SRC2: 0}", "data.mix: weight of .* must be > 0"),
    ("{SRC: 1.0, /no/such/dir: 1.0}", "data.mix: source /no/such/dir has no train.bin or meta.json"),
    ("{}", "data.mix: is empty"),
])
def test_bad_mixtures_are_one_line_errors(three_sources, tmp_path, mix, message):
    mix = mix.replace("SRC2", str(three_sources[1])).replace("SRC", str(three_sources[0]))
    proc = run_cli("pretrain", f"data.mix={mix}", f"out_dir={tmp_path}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    import re
    assert re.search(message, lines[0]), lines[0]
    with pytest.raises(ConfigError, match="exactly one of data.dir"):
        load_config(PretrainConfig, None, [f"data.dir={three_sources[2]}", f"data.mix={{{three_sources[2]}: 1}}"])


def test_the_example_mixture_config_validates(three_sources):
    from lmforge.config import read_yaml

    example = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "mixture.yaml"
    assert list(read_yaml(example)["data"]["mix"].values()) == [6, 3, 1]
    mix = "data.mix={" + ", ".join(f"{p}: {w}" for p, w in zip(three_sources, (6, 3, 1))) + "}"
    cfg = load_config(PretrainConfig, example, [mix])
    assert list(cfg.data.mix.values()) == [6, 3, 1] and cfg.data.dir is None
    with pytest.raises(ConfigError, match="data.mix: source data/web has no train.bin or meta.json"):
        load_config(PretrainConfig, example)


def test_mixture_sources_must_share_one_vocabulary(three_sources, tmp_path):
    from lmforge.tokens.shards import write_shards
    from lmforge.train.config import DataConfig
    from lmforge.train.data import PretrainData

    (tmp_path / "other.txt").write_text("xyz " * 100)
    write_shards(tmp_path / "other.txt", "char", tmp_path / "other")
    with pytest.raises(UserError, match=r"^data.mix: .*other has vocab_size 5 and eos_id 4, .*web has 30 and 29; tokenize every source with one tokenizer$"):
        PretrainData.open(DataConfig(mix={three_sources[0]: 1, tmp_path / "other": 1}), None)
