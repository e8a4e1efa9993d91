"""`lmforge serve`: the OpenAI-compatible server."""
from __future__ import annotations

from lmforge.command import Command


def _serve_config():
    from lmforge.serve.server import ServeConfig
    return ServeConfig


def run_serve(cfg) -> int:
    from lmforge.serve.server import serve
    return serve(cfg)


COMMANDS = [
    Command("serve", "OpenAI-compatible HTTP server with continuous batching and Prometheus metrics", _serve_config,
            run_serve, positionals=("model",),
            description="Serve MODEL (an alias, .gguf, HF directory, run or LoRA adapter) over the OpenAI API: "
                        "/v1/completions, /v1/chat/completions, /v1/models, /tokenize, /detokenize, /generate, "
                        "/health, /metrics."),
]
