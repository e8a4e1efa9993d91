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
from pathlib import Path
from typing import Literal

from pydantic import Field

from lmforge.config import Strict



class ServeConfig(Strict):
    """Everything `lmforge serve` takes; a --config YAML uses these names, command-line flags override it."""
    model: str
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: list[str] = Field(default_factory=list)
    served_model_name: list[str] = Field(default_factory=list)
    max_batch: int = Field(32, ge=1, le=1024)
    max_queue: int = Field(256, ge=0)
    max_model_len: int | None = Field(None, ge=16)
    max_prefill_tokens: int = Field(1024, ge=16)
    request_timeout: float = Field(600.0, gt=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    threads: int | None = Field(None, ge=1)
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    backend: Literal["lmforge", "vllm"] = "lmforge"


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
    import torch

    from lmforge.generate import eos_ids
    from lmforge.model.load import load_model, load_tokenizer
    from lmforge.serve.engine import Engine
    from lmforge.device import pick_device

    try:
        device = pick_device(cfg.device)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
            cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
        tok = load_tokenizer(cfg.model)
        model = load_model(cfg.model, dtype=dtype, device=device, merge_adapter=True).eval()
        engine = Engine(model, tok, eos_ids(model, tok), max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                        max_model_len=cfg.max_model_len, max_prefill_tokens=cfg.max_prefill_tokens,
                        threads=cfg.threads, metrics=state.metrics)
    except Exception as e:  # any load failure: one line, then the server stops
        state.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {state.load_error}", file=sys.stderr, flush=True)
        server.should_exit = True
        return
    engine.start()
    state.tokenizer, state.engine = tok, engine
    n = sum(p.numel() for p in model.parameters())
    print(f"ready: {state.names[0]} ({n / 1e6:.0f}M params, {device}, {dtype}) at http://{cfg.host}:{server.config.port}"
          f"/v1 (max batch {cfg.max_batch}, max model len {engine.max_model_len})", flush=True)


def serve(cfg: ServeConfig) -> int:
    """Run the server until interrupted; 2 when the model failed to load."""
    if cfg.backend == "vllm":
        return _exec_vllm(cfg)
    import uvicorn

    from lmforge.model.load import resolve
    from lmforge.serve.api import ServerState, create_app
    from lmforge.serve.metrics import Metrics

    resolve(cfg.model)  # a missing path or unknown alias fails here, before the port opens
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


def load_serve_config(path: str | Path | None, flags: dict) -> ServeConfig:
    """The YAML file's settings, then the flags that were given (None or [] means not given)."""
    from pydantic import ValidationError

    from lmforge.config import ConfigError, format_validation_error, read_yaml

    tree = read_yaml(path) if path else {}
    tree.update({k: v for k, v in flags.items() if v is not None and v != []})
    if "model" not in tree:
        raise ConfigError("serve needs a MODEL argument (or `model:` in the --config file)")
    try:
        return ServeConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None
