"""OpenAI request schemas with their limits (after vLLM's entrypoints/openai/protocol.py).

Unknown fields are rejected the way OpenAI does ("Unrecognized request argument supplied"), so a
typo such as `max_token` is an error rather than a silently ignored setting.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from lmforge.config import Strict

I64 = 2**63 - 1


class StreamOptions(Strict):
    include_usage: bool = False


class _Sampling(Strict):
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=1_000_000)
    n: int = Field(1, ge=1, le=128)
    seed: int | None = Field(None, ge=-I64 - 1, le=I64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 16:
            raise ValueError("at most 16 stop strings")
        if any(len(s) > 256 for s in stops):
            raise ValueError("a stop string is longer than 256 characters")
        return [s for s in stops if s]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0, le=I64)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty list")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("prompt holds an empty token list")
        return v


class ContentPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=I64)
    max_completion_tokens: int | None = Field(None, ge=1, le=I64)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    add_generation_prompt: bool = True


class GenerateRequest(Strict):
    """The guide's minimal endpoint: POST /generate {prompt, max_tokens, temperature}."""
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(100, ge=1, le=I64)
    temperature: float = Field(0.7, ge=0.0, le=2.0)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)
