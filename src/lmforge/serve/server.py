"""`lmforge serve`: load a model in the background, run the engine thread and the HTTP API under uvicorn.

/health answers 503 until the model is loaded. A model that fails to load stops the server with a
one-line error (exit 2), so a process manager sees the failure instead of a server that never
becomes healthy. `--backend vllm` hands the same settings to vLLM's own OpenAI server instead, and
refuses those vLLM has no equivalent for (VLLM_PASSED and VLLM_REFUSED below).

API keys come from --api-key, LMFORGE_API_KEY and --api-key-file; they are never printed, and a key
found on the process's command line (which `ps` shows every user) gets a one-line warning.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lmforge.command import warn_if_on_command_line
from lmforge.config import Strict
from lmforge.errors import UserError

API_KEY_ENV = "LMFORGE_API_KEY"


class ServeConfig(Strict):
    """Everything `lmforge serve` takes, as config keys; every key is also a --flag."""
    model: str = Field(description="model spec: alias, .gguf, HF directory, run or LoRA adapter (merged at load)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    api_key: list[str] = Field(default_factory=list, repr=False, description=(
        "require 'Authorization: Bearer KEY' on /v1, /generate, /tokenize, /detokenize (repeatable); on the command "
        f"line `ps` shows it: prefer {API_KEY_ENV} or api_key_file"))
    api_key_file: Path | None = Field(None, description="a file of API keys, one per line (blank lines and # "
                                                        f"comments ignored); keys also come from {API_KEY_ENV}")
    served_model_name: list[str] = Field(default_factory=list, description="name(s) clients send as `model` "
                                                                           "(empty: MODEL as given)")
    max_batch: int = Field(32, ge=1, le=1024, description="sequences decoded together")
    max_queue: int = Field(256, ge=0, description="requests that may wait; more get 429")
    max_model_len: int | None = Field(None, ge=16, description="context window: prompt + max_tokens (None: the "
                                                               "model's)")
    max_prefill_tokens: int = Field(1024, ge=16, description="prompt tokens prefilled per step")
    request_timeout: float = Field(600.0, gt=0, description="seconds before a request is abandoned with 408")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="request body cap; larger gets 413")
    threads: int | None = Field(None, ge=1, description="CPU threads for the model (None: all cores; give each "
                                                        "replica its share when several run on one machine)")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights dtype; auto: bfloat16 on CUDA, float32 elsewhere")
    backend: Literal["lmforge", "vllm"] = Field("lmforge", description="vllm: run vLLM's own server with these "
                                                                       "settings")

    @field_validator("api_key", mode="before")
    @classmethod
    def _keys_as_text(cls, v):
        """Numbers in YAML (`api_key: [1234]`) are the keys' text: pydantic's error would quote them."""
        items = v if isinstance(v, list) else [v]
        return [str(k) if isinstance(k, (int, float)) and not isinstance(k, bool) else k for k in items]


# ---- API keys ------------------------------------------------------------------------------------
def read_key_file(path: Path) -> list[str]:
    """The keys in `path`, one per line; blank lines and lines starting with # are skipped.

    A missing, unreadable or empty file is a one-line error: a server meant to need a key never starts open."""
    where = f"api_key_file {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror or type(e).__name__})") from None
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise UserError(f"{where}: holds no key (one key per line; blank lines and # comments are ignored)")
    return keys


def resolve_api_keys(cfg: ServeConfig, environ=os.environ) -> list[str]:
    """Every key the server accepts: api_key, then LMFORGE_API_KEY, then api_key_file (each once).

    Checked here rather than by pydantic, whose errors would quote the keys."""
    keys = list(cfg.api_key)
    if environ.get(API_KEY_ENV, "").strip():
        keys.append(environ[API_KEY_ENV].strip())
    if cfg.api_key_file is not None:
        keys += read_key_file(cfg.api_key_file)
    if any(not k.strip() for k in keys):
        raise UserError("api_key: a key is empty (it would accept 'Authorization: Bearer ' with no key)")
    return list(dict.fromkeys(keys))


# ---- --backend vllm ------------------------------------------------------------------------------
# How `--backend vllm` carries each ServeConfig key to `vllm serve` (flags as vLLM's serve arguments name
# them). Every key is in VLLM_PASSED or VLLM_REFUSED; tests/test_serve.py fails on a key in neither.
VLLM_PASSED = {
    "model": "vllm serve MODEL: the HF directory lmforge resolves MODEL to (merge an adapter with export first)",
    "host": "--host",
    "port": "--port",
    "api_key": "VLLM_API_KEY in vLLM's environment (one key: more would have to go on its argv, which ps shows)",
    "api_key_file": "VLLM_API_KEY, as api_key",
    "served_model_name": "--served-model-name (MODEL as given when empty, as lmforge does)",
    "max_batch": "--max-num-seqs",
    "max_model_len": "--max-model-len (when set; else both use the model's)",
    "max_prefill_tokens": "--max-num-batched-tokens, plus max_batch: vLLM's step budget counts decode tokens too",
    "dtype": "--dtype (auto is resolved by lmforge's policy first: vLLM's auto runs float32 weights in float16)",
    "backend": "chooses vLLM itself",
}
# Keys vLLM has no equivalent for: accepted at their defaults (lmforge's own limits, which do not apply under
# vLLM: the startup line says so) and refused with a one-line error when set to anything else.
VLLM_REFUSED = {
    "max_queue": "vLLM does not bound its waiting queue",
    "request_timeout": "vLLM has no per-request timeout",
    "max_body_bytes": "vLLM does not cap request bodies",
    "threads": "vLLM sets its own CPU threads",
    "device": "vLLM runs on the platform it was built for and has no --device flag since v0.10",
}
VLLM_KEY_SCOPE = ("vLLM checks the API key only under /v1 (and /v2, /inference); its /invocations (inference), "
                  "/tokenize and /detokenize stay open: keep --host on loopback or put a proxy that checks keys "
                  "in front")


def vllm_command(cfg: ServeConfig, model_dir: str, keys: list[str],
                 auto_dtype: str = "bfloat16") -> tuple[list[str], dict]:
    """The `vllm serve` command line and extra environment with the same meaning as our settings (VLLM_PASSED).

    A key vLLM cannot honour (VLLM_REFUSED, set away from its default) is a UserError, never dropped silently."""
    for key, reason in VLLM_REFUSED.items():
        value, default = getattr(cfg, key), ServeConfig.model_fields[key].get_default(call_default_factory=True)
        if value != default:
            raise UserError(f"--backend vllm: {key}={value!r} has no vLLM equivalent ({reason}); leave it at "
                            f"{default!r} or use --backend lmforge")
    if len(keys) > 1:
        raise UserError(f"--backend vllm takes one API key, got {len(keys)}: vLLM reads one from VLLM_API_KEY, and "
                        "more would have to go on its command line, where ps shows them")
    cmd = ["vllm", "serve", model_dir, "--host", cfg.host, "--port", str(cfg.port),
           "--served-model-name", *(cfg.served_model_name or [cfg.model]), "--max-num-seqs", str(cfg.max_batch),
           "--max-num-batched-tokens", str(cfg.max_prefill_tokens + cfg.max_batch),
           "--dtype", auto_dtype if cfg.dtype == "auto" else cfg.dtype]
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    return cmd, ({"VLLM_API_KEY": keys[0]} if keys else {})


def _exec_vllm(cfg: ServeConfig, keys: list[str]) -> int:
    """Replace this process with `vllm serve` (so signals and the exit status are vLLM's own)."""
    exe = shutil.which("vllm")
    if exe is None:
        raise UserError("--backend vllm needs the vllm package (pip install vllm, on a machine with a GPU)")
    auto_dtype = "bfloat16"
    if cfg.dtype == "auto":  # lmforge's policy on the device vLLM will use
        from lmforge.device import inference_dtype, pick_device

        auto_dtype = str(inference_dtype(pick_device("auto"), "auto")).removeprefix("torch.")
    from lmforge.model.load import hf_dir

    model_dir = str(hf_dir(cfg.model))  # an adapter is refused here: merge it with export first
    cmd, env = vllm_command(cfg, model_dir, keys, auto_dtype)
    print(f"note: under vLLM, lmforge's own {', '.join(VLLM_REFUSED)} settings do not apply (vLLM has no "
          "equivalent)", flush=True)
    if keys:
        print(f"warning: {VLLM_KEY_SCOPE}", file=sys.stderr, flush=True)
    print("exec: " + " ".join(cmd) + (" (API key in VLLM_API_KEY)" if keys else ""), flush=True)
    os.execve(exe, cmd, {**os.environ, **env})
    return 0  # not reached


def _load(cfg: ServeConfig, state, server) -> None:
    """Load model and tokenizer, start the engine, mark the server ready; on failure stop the server."""
    from lmforge.infer import Engine, load_for_inference

    try:
        m = load_for_inference(cfg.model, cfg.device, cfg.dtype)
        engine = Engine(m.model, m.tokenizer, m.eos_ids, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                        max_model_len=cfg.max_model_len, max_prefill_tokens=cfg.max_prefill_tokens,
                        threads=cfg.threads, metrics=state.metrics)
    except Exception as e:  # any load failure: one line, then the server stops
        state.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {state.load_error}", file=sys.stderr, flush=True)
        server.should_exit = True
        return
    engine.start()
    state.tokenizer, state.engine = m.tokenizer, engine
    print(f"ready: {state.names[0]} ({m.n_params / 1e6:.0f}M params, {m.device}, {m.dtype}) at "
          f"http://{cfg.host}:{server.config.port}/v1 (max batch {cfg.max_batch}, "
          f"max model len {engine.max_model_len})", flush=True)


def serve(cfg: ServeConfig) -> int:
    """Run the server until interrupted; 2 when the model failed to load."""
    keys = resolve_api_keys(cfg)
    warn_if_on_command_line(keys, "an API key", f"{API_KEY_ENV} or --api-key-file")
    if cfg.backend == "vllm":
        return _exec_vllm(cfg, keys)
    import uvicorn

    from lmforge.device import pick_device
    from lmforge.model.load import resolve
    from lmforge.serve.api import create_app
    from lmforge.serve.metrics import Metrics
    from lmforge.serve.state import ServerState

    resolve(cfg.model)  # a missing path or unknown alias fails here, before the port opens
    pick_device(cfg.device, key="device")  # and so does a device that is not there
    names = cfg.served_model_name or [cfg.model]
    state = ServerState(names=names, metrics=Metrics(names[0]), api_keys=keys,
                        request_timeout=cfg.request_timeout, max_body_bytes=cfg.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5, timeout_keep_alive=75))
    n_keys = f", {len(keys)} API key(s)" if keys else ""  # how many, never which
    print(f"loading {cfg.model} (serving as {', '.join(names)}{n_keys}) on http://{cfg.host}:{cfg.port}", flush=True)
    loader = threading.Thread(target=_load, args=(cfg, state, server), daemon=True)
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.stop()
    return 2 if state.load_error else 0
