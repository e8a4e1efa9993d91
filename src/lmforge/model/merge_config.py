"""`lmforge merge`'s config: mergekit's YAML keys as a pydantic model, without importing torch (the CLI validates a
config, and reports a misspelt key, before any heavy import)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmforge.config import Strict

# merge_methods.METHODS, by name (merge.py checks the two agree when it loads).
METHOD_NAMES = ("linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                "breadcrumbs_ties", "della", "della_linear", "model_stock")


class InputModel(Strict):
    model: str = Field(description="a model the loader accepts: HF dir, run, .gguf, alias, LoRA adapter")
    parameters: dict[str, Any] | None = Field(None, description="per-model parameters (weight, density, ...)")


class MergeConfig(Strict):
    models: list[InputModel] = Field(description="the models to merge (mergekit's `models:` list)")
    merge_method: str = Field(description=f"one of {', '.join(METHOD_NAMES)}")
    base_model: str | None = Field(None, description="the base model (task arithmetic, TIES, DARE, SLERP, ...)")
    parameters: dict[str, Any] | None = Field(None, description="global parameters, and defaults of per-model ones")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="dtype the inputs are merged "
                                                                                      "in (None: promoted)")
    out_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="dtype written (None: "
                                                                                          "dtype)")
    tokenizer_source: str | None = Field(None, description="`base` or a model whose tokenizer the output gets "
                                                           "(None: the base model's, else the first model's)")
    out: Path = Field(description="output directory (must be empty or new)")
    overwrite: bool = Field(False, description="replace a non-empty out directory")
    random_seed: int | None = Field(None, description="seed of the random methods (dare_*, della*)")
    max_shard_bytes: int = Field(5 * 1024 ** 3, gt=0, description="largest output safetensors file (HF's default 5 GB)")

    @field_validator("merge_method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in METHOD_NAMES:
            raise ValueError(f"unknown merge method {v!r}; lmforge merges with {', '.join(METHOD_NAMES)}")
        return v

    @field_validator("tokenizer_source")
    @classmethod
    def _not_union(cls, v: str | None) -> str | None:
        if v == "union":
            raise ValueError("`union` (a merged vocabulary) is not supported; use `base` or a model's name")
        return v
