"""Multi-node pretraining through torchrun's c10d rendezvous, on one machine.

Two torchrun launchers (`--nnodes 2 --nproc_per_node 1`, one per "node") meet at a c10d rendezvous on
127.0.0.1, as two SLURM nodes meet at the first node's hostname (deploy/slurm/pretrain.sbatch). The run
they make together must be the single-machine run of the same world size (`--nproc_per_node 2`), step for
step, and, the global batch being a pure function of the seed and the step, one process with grad_accum=2.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, free_port

STEPS = 8
TIMEOUT = 150
ARGS = ["model.preset=tiny", "model.max_seq_len=32", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
        "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0", "train.warmup_steps=2",
        "train.lr=1e-3", "train.device=cpu", "train.precision=fp32", "train.threads=1",
        "log.progress=false", "log.tensorboard=false", "resume=never"]


def _env() -> dict:
    """This environment without any torchrun variables of an enclosing launcher; one thread per process."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def train_lines(out: Path) -> dict[int, dict]:
    """Train lines of out/metrics.jsonl by step; a step logged twice means a rank other than 0 wrote."""
    lines = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = [r["step"] for r in lines]
    assert len(steps) == len(set(steps)), f"steps logged more than once: {steps}"
    return {r["step"]: r for r in lines}


def pretrain_cmd(launcher: list[str], data: Path, out: Path, *overrides: str) -> list[str]:
    return [*launcher, "-m", "lmforge", "pretrain", f"data.dir={data}", f"out_dir={out}", *ARGS, *overrides]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=_env())
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"


def torchrun(*flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *flags]


@pytest.fixture(scope="module")
def one_machine(char_shards, tmp_path_factory) -> Path:
    """The single-machine run of world size 2 (`torchrun --standalone --nproc_per_node 2`) both tests match."""
    out = tmp_path_factory.mktemp("multinode") / "one-machine"
    run(pretrain_cmd(torchrun("--standalone", "--nproc_per_node=2"), char_shards, out,
                     "train.parallel=ddp", "train.grad_accum=1"))
    return out


@pytest.mark.slow
def test_two_nodes_through_c10d_rendezvous_match_one_machine(char_shards, one_machine, tmp_path):
    port, rdzv_id = free_port(), f"lmforge-test-{uuid.uuid4().hex[:8]}"
    node = torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}", "--max_restarts=0")
    multi = tmp_path / "two-nodes"
    cmd = pretrain_cmd(node, char_shards, multi, "train.parallel=ddp", "train.grad_accum=1")
    # Both launchers start at once; whichever binds the endpoint first hosts the c10d store (the other
    # connects to it), as on a cluster where every node runs the same line.
    nodes = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
             for _ in range(2)]
    outs = []
    try:
        for p in nodes:
            outs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, f"a node failed ({p.returncode}):\n{out[-4000:]}"
    # Rank 0 (on whichever node got it) alone prints the summary and writes the metrics.
    assert sum(out.count(f"steps {STEPS} in ") for out in outs) == 1, outs

    one_process = tmp_path / "one-process"
    run(pretrain_cmd([sys.executable], char_shards, one_process, "train.grad_accum=2"))

    got, ref, single = train_lines(multi), train_lines(one_machine), train_lines(one_process)
    assert sorted(got) == sorted(ref) == sorted(single) == list(range(1, STEPS + 1))
    assert ref[STEPS]["loss"] < ref[1]["loss"]  # it trains at all
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), f"loss at step {s}: two nodes vs one machine"
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-5), f"grad_norm at step {s}"
        # One process sums the same windows in another order (accumulation vs all-reduce): fp32 rounding only.
        assert single[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-4), f"loss at step {s}: one process"


@pytest.mark.slow
def test_slurm_example_runs_two_nodes_on_localhost(char_shards, one_machine, tmp_path):
    """deploy/slurm/pretrain.sbatch as SLURM would run it on a 2-node allocation, with `srun` and `scontrol`
    stood in for by scripts that start its one task per node on this machine (both "nodes" are localhost)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(  # `scontrol show hostnames LIST`: one host per line
        "#!/usr/bin/env bash\n[[ $1 == show && $2 == hostnames ]] || exit 2\nprintf '%s\\n' localhost localhost\n")
    (bin_dir / "srun").write_text(  # one task per node: drop srun's options, start the command once per node
        "#!/usr/bin/env bash\nwhile [[ $1 == -* ]]; do shift; done\npids=()\n"
        "for node in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$node \"$@\" & pids+=($!); done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=1; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "slurm-run"
    env = {**_env(), "PATH": f"{bin_dir}:{_env()['PATH']}", "PYTHON": sys.executable, "NPROC_PER_NODE": "1",
           "RDZV_PORT": str(free_port()), "SLURM_JOB_ID": uuid.uuid4().hex[:8], "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_CPUS_PER_TASK": "1"}
    cmd = ["bash", "deploy/slurm/pretrain.sbatch", f"data.dir={char_shards}", f"out_dir={out}", *ARGS,
           "train.parallel=ddp", "train.grad_accum=1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}"
    assert "2 nodes x 1 processes, rendezvous at localhost:" in proc.stdout
    assert proc.stdout.count(f"steps {STEPS} in ") == 1, proc.stdout
    got, ref = train_lines(out), train_lines(one_machine)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-6), f"loss at step {s}"
