"""`lmforge plan ...`: estimate a job's memory (and cost) before it runs, from the configs the stages use."""
from __future__ import annotations

from importlib import import_module
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lmforge.command import Command


class PlanMemoryConfig(BaseModel):
    """The planner's own keys; every other key is the training config's and is checked by that stage's model."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    device: str | None = Field(None, description="a catalogue device (a100-40gb, a100-80gb, h100-80gb, h200-141gb, "
                                                 "l4-24gb, rtx4090-24gb, cpu): say whether the job fits it and, if "
                                                 "not, the cheapest change that does")
    gpus: int = Field(1, gt=0, description="devices (processes) the job runs on; train.parallel=ddp|fsdp shards over "
                                           "them")
    model: str | dict[str, Any] | None = Field(None, description="a preset (tiny ... 70b) or any model source (HF "
                                                                 "dir, .gguf, smollm2-135m-instruct); in a config "
                                                                 "file, the pretrain `model:` section")
    method: Literal["full", "lora", "qlora"] | None = Field(None, description="fine-tuning method (default: full for "
                                                                              "a pretrain config or --model)")
    cpu_offload: bool | None = Field(None, description="FSDP keeps parameters, gradients and optimizer states in CPU "
                                                       "memory (default: train.cpu_offload)")
    max_batch: int | None = Field(None, gt=0, description="serving: sequences decoded together (plans the KV cache "
                                                          "instead of training)")
    max_model_len: int | None = Field(None, gt=0, description="serving: prompt + completion tokens per sequence")
    json_out: bool = Field(False, description="print one JSON object instead of the table")


def run_plan_memory(cfg: PlanMemoryConfig) -> int:
    from lmforge.plan.memory import plan_memory_main

    return plan_memory_main(cfg)


COMMANDS = [
    Command("plan memory", "memory per device for a training or serving job, and whether it fits",
            lambda: PlanMemoryConfig, run_plan_memory, aliases={"--json": "json_out"},
            description="Estimate weights, gradients, optimizer states, activations, KV cache and allocator overhead "
                        "per device for a pretrain, finetune or align CONFIG.yaml (with key=value overrides), or for "
                        "--model PRESET|MODEL --method full|lora|qlora; from formulas, without building the model."),
    Command("plan cost", "training FLOPs, GPU-hours and dollars; serving $/M tokens; API vs self-host breakeven",
            lambda: import_module("lmforge.plan.cost").PlanCostConfig,
            lambda cfg: import_module("lmforge.plan.cost").plan_cost_main(cfg), positionals=("what",),
            aliases={"--json": "json_out"},
            description="guide (default): the guide's 7B/1T and 70B/2T A100 scenarios and its breakeven, recomputed; "
                        "train: FLOPs (6ND + attention), GPU-hours at an assumed or measured (--run) MFU, wall time, "
                        "dollars; serve: $ per million tokens from --tokens-per-sec, --bench or --metrics-url; "
                        "breakeven: API vs self-hosting with whole replicas counted."),
]
