"""Sharded (DCP) checkpoints: no rank gathers the state to save it, background saves, export from the shards,
HF weights written in pieces, and a checkpoint index that cannot run code."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from lmforge.model.sharded import (LazyWeights, ShardedCheckpointError, ShardedWeights, read_safetensors,
                                   write_safetensors)
from test_distributed import _env, run_pretrain, train_lines
from test_distributed import data  # noqa: F401  (the module-scoped corpus fixture)

PROBE = textwrap.dedent('''
    """Under torchrun: train a tiny FSDP model one step, then save a checkpoint while every gather is a failure."""
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import DTensor
    from lmforge.model.build import build_model
    from lmforge.model.config import ModelConfig
    from lmforge.train.checkpoint import Checkpointer
    from lmforge.train.config import GuardConfig, TrainConfig
    from lmforge.train.distributed import init_runtime
    from lmforge.train.job import Job
    from lmforge.train.state import TrainState, build_engine

    rt = init_runtime("cpu", "fsdp")
    built = build_model(ModelConfig(preset="tiny", vocab_size=64, max_seq_len=16), 0)
    full = sum(p.numel() for p in built.module.parameters())  # the unsharded parameters (Adam keeps 2 moments each)
    full_sd = sum(t.numel() for t in built.module.state_dict().values())  # a tied head counts twice here
    engine = build_engine(built.module, built.blocks, TrainConfig(parallel="fsdp", device="cpu", precision="fp32"),
                          GuardConfig(), rt, "fp32")
    x = torch.randint(0, 64, (2, 16))
    engine.model(x).float().logsumexp(-1).mean().backward()
    engine.optimizer.step()

    def refuse(*a, **k):
        raise AssertionError("a gather ran while saving")
    DTensor.full_tensor = refuse
    dist.all_gather_into_tensor = refuse
    dist.all_gather = refuse
    seen = {}
    real_save = dcp.save
    def save(state, **kw):
        local = lambda t: (t.to_local() if isinstance(t, DTensor) else t).numel()
        seen["optim_local"] = sum(local(v) for s in state["optim"]["state"].values() for k, v in s.items()
                                  if k != "step")
        seen["model_local"] = sum(local(v) for v in state["model"].values())
        return real_save(state, **kw)
    dcp.save = save

    class Log:
        bar = None
        def event(self, *a): pass
    job = Job(model=built.module, objective=None, train_batches=None, eval_batches=None, save_model=None,
              load_model=None)
    Checkpointer(Path(sys.argv[1]), job, engine, rt, Log(), 2, {}).save(TrainState(1, 1, step=1))
    report = {"rank": rt.rank, "full": full, "full_sd": full_sd, **seen}
    (Path(sys.argv[1]).parent / f"rank{rt.rank}.json").write_text(json.dumps(report))  # not stdout: ranks interleave
    dist.destroy_process_group()
''')


def test_no_rank_gathers_the_state_to_save_it(tmp_path):
    """Two FSDP ranks save with every gather made to fail: each hands DCP its own half of the optimizer state
    (Adam's two moments) and of the model, and together they hold it all once."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=180,
                          env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    full, full_sd = ranks[0]["full"], ranks[0]["full_sd"]
    for r in ranks:
        assert r["optim_local"] < 0.6 * 2 * full, r  # far from the 2 x full a gathered copy would hold
        assert r["model_local"] < 0.6 * full_sd, r
    assert sum(r["optim_local"] for r in ranks) == 2 * full
    assert sum(r["model_local"] for r in ranks) == full_sd
    assert (tmp_path / "ckpt" / "step-0000001" / "dcp" / ".metadata").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step-0000001" / "dcp").glob("*.distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]


@pytest.fixture(scope="module")
def stopped_runs(data, tmp_path_factory):  # noqa: F811
    """A one-process run in each format, stopped by a NaN at step 11 right after its step-10 checkpoint."""
    root = tmp_path_factory.mktemp("sharded_runs")
    stop = ("guards.debug_nan_steps=[11]", "guards.max_bad_steps=1", "guards.on_repeated_bad=stop",
            "train.grad_accum=2")
    for name, extra in (("full", ()), ("async", ("train.async_checkpoint=true",))):
        proc = run_pretrain(data, root / name, *stop, *extra, check=False)
        assert proc.returncode != 0 and "bad steps" in proc.stderr
    return root


def test_background_saves_publish_and_resume(data, stopped_runs):  # noqa: F811
    """`train.async_checkpoint` writes DCP shards in the background; the step-10 checkpoint is published when the
    run stops, resumes to the same losses as the full format, and the run ends with HF weights from the shards."""
    full, bg = stopped_runs / "full", stopped_runs / "async"
    assert (bg / "checkpoints" / "latest").read_text().strip() == "step-0000010"
    ckpt = bg / "checkpoints" / "step-0000010"
    assert (ckpt / "dcp" / ".metadata").is_file() and not (ckpt / "model.safetensors").exists()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["format"] == "sharded" and "state" not in state["optimizer"]  # tensors live in the shards

    for out in (full, bg):
        run_pretrain(data, out, "train.grad_accum=2", *(("train.async_checkpoint=true",) if out == bg else ()))
    ref, got = train_lines(full), train_lines(bg)
    for s in range(11, 21):
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), f"loss at step {s}"
    final = bg / "checkpoints" / "step-0000020"
    assert (final / "dcp" / ".metadata").is_file() and (final / "config.json").is_file()
    want = load_file(str(full / "checkpoints" / "step-0000020" / "model.safetensors"))
    have = load_file(str(final / "model.safetensors"))
    assert have.keys() == want.keys()
    assert max((have[k] - want[k]).abs().max().item() for k in want) < 1e-5


def test_export_streams_a_sharded_checkpoint_to_hf(stopped_runs, tmp_path):
    """`lmforge export RUN` on a run whose latest checkpoint is shards only: the HF directory's weights equal the
    full-format checkpoint of the same step, and transformers loads it; `generate` on the shards says to export."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    shutil.copytree(stopped_runs / "async", run)
    (run / "checkpoints" / "latest").write_text("step-0000010\n")
    for d in (run / "checkpoints").glob("step-0000020"):
        shutil.rmtree(d)
    gen = subprocess.run([sys.executable, "-m", "lmforge", "generate", str(run), "a"],
                         capture_output=True, text=True, env=_env())
    assert gen.returncode == 2 and "lmforge export" in gen.stderr and len(gen.stderr.strip().splitlines()) == 1
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "lmforge", "export", str(run), "--out", str(out)],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    want = load_file(str(stopped_runs / "full" / "checkpoints" / "step-0000010" / "model.safetensors"))
    have = read_safetensors(out)
    assert have.keys() == want.keys()
    assert max((have[k] - want[k]).abs().max().item() for k in want) == 0.0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    assert (out / "generation_config.json").is_file()


def test_hf_weights_are_written_in_bounded_pieces(tmp_path):
    """Over the shard size, the weights go to numbered files plus HF's index, read back as one state dict; each
    tensor is asked for once, when its shard is being filled."""
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(10)}  # 1 KiB each
    asked: list[str] = []
    lazy = LazyWeights({k: (lambda k=k: asked.append(k) or tensors[k]) for k in tensors})
    names = write_safetensors(tmp_path, lazy, max_shard_bytes=3 * 1024)
    assert names[-1] == "model.safetensors.index.json" and len(names) == 5  # 4 files of <= 3 tensors
    assert asked == list(tensors)
    back = read_safetensors(tmp_path)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["w9"] == "model-00004-of-00004.safetensors"
    one = tmp_path / "one"
    assert write_safetensors(one, tensors) == ["model.safetensors"]


class Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_checkpoint_index_cannot_run_code(stopped_runs, tmp_path, capsys):
    """DCP's index is a pickle: ours admits only DCP's metadata classes, so a planted callable is refused
    with a one-line error, before anything is called."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(stopped_runs / "async" / "checkpoints" / "step-0000010", ckpt)
    assert len(ShardedWeights(ckpt, "model")) > 0
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ShardedCheckpointError, match="builtins.print is not allowed"):
        ShardedWeights(ckpt, "model")
    assert "code ran" not in capsys.readouterr().out


def test_an_intermediate_deepspeed_checkpoint_is_not_exported_but_explained(tmp_path):
    """DeepSpeed's partitions are not read by export (they are pickles DeepSpeed unpickles in full): one line
    names the checkpoint and the two ways to its weights."""
    from lmforge.errors import UserError
    from lmforge.model.export import export_model
    ckpt = tmp_path / "step-0000004"
    (ckpt / "deepspeed").mkdir(parents=True)
    with pytest.raises(UserError, match=r"intermediate checkpoint of DeepSpeed.s engine .*zero_to_fp32.py .* or resume the run"):
        export_model(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
