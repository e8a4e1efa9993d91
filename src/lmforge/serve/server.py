"""`lmforge serve`: load a model in the background, run the engine thread and the HTTP API under uvicorn.

/health answers 503 until the model is loaded. A model that fails to load stops the server with a
one-line error (exit 2), so a process manager sees the failure instead of a server that never
becomes healthy. `--backend vllm` hands the same flags to vLLM's own OpenAI server instead.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from typing import Literal

from pydantic import Field

from lmforge.config import Strict


class ServeConfig(Strict):
    """Everything `lmforge serve` takes, as config keys; every key is also a --flag."""
    model: str = Field(description="model spec: alias, .gguf, HF directory, run or LoRA adapter (merged at load)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="port")
    api_key: list[str] = Field(default_factory=list, description="require 'Authorization: Bearer KEY' on /v1, "
                                                                 "/generate, /tokenize, /detokenize (repeatable)")
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


def vllm_command(cfg: ServeConfig, model_dir: str) -> tuple[list[str], dict]:
    """The `vllm serve` command line and extra environment with the same meaning as our flags.

    The API key goes through vLLM's VLLM_API_KEY variable, not argv, where `ps` would show it."""
    if len(cfg.api_key) > 1:
        raise ValueError("--backend vllm takes one --api-key")
    cmd = ["vllm", "serve", model_dir, "--host", cfg.host, "--port", str(cfg.port),
           "--max-num-seqs", str(cfg.max_batch), "--served-model-name", *(cfg.served_model_name or [cfg.model])]
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.dtype != "auto":
        cmd += ["--dtype", cfg.dtype]
    return cmd, ({"VLLM_API_KEY": cfg.api_key[0]} if cfg.api_key else {})


def _exec_vllm(cfg: ServeConfig) -> int:
    from lmforge.model.load import hf_dir

    exe = shutil.which("vllm")
    if exe is None:
        raise ValueError("--backend vllm needs the vllm package (pip install vllm, on a machine with a GPU)")
    cmd, env = vllm_command(cfg, str(hf_dir(cfg.model)))  # an adapter is refused here: merge it with export first
    print("exec: " + " ".join(cmd), flush=True)
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
    if cfg.backend == "vllm":
        return _exec_vllm(cfg)
    import uvicorn

    from lmforge.device import pick_device
    from lmforge.model.load import resolve
    from lmforge.serve.api import create_app
    from lmforge.serve.metrics import Metrics
    from lmforge.serve.state import ServerState

    resolve(cfg.model)  # a missing path or unknown alias fails here, before the port opens
    pick_device(cfg.device, key="device")  # and so does a device that is not there
    names = cfg.served_model_name or [cfg.model]
    state = ServerState(names=names, metrics=Metrics(names[0]), api_keys=cfg.api_key,
                        request_timeout=cfg.request_timeout, max_body_bytes=cfg.max_body_bytes)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(uvicorn.Config(create_app(state), host=cfg.host, port=cfg.port, log_level="warning",
                                           timeout_graceful_shutdown=5, timeout_keep_alive=75))
    keys = f", {len(cfg.api_key)} API key(s)" if cfg.api_key else ""
    print(f"loading {cfg.model} (serving as {', '.join(names)}{keys}) on http://{cfg.host}:{cfg.port}", flush=True)
    loader = threading.Thread(target=_load, args=(cfg, state, server), daemon=True)
    loader.start()
    server.run()
    if state.engine is not None:
        state.engine.stop()
    return 2 if state.load_error else 0
