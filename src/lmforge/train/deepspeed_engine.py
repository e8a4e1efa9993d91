"""DeepSpeed's own engine for a `deepspeed:` ds_config: build it, run one micro-batch and one update, checkpoint, export.

Why: issue 15 asks that a ds_config runs on DeepSpeed itself where DeepSpeed and CUDA are there (the guide's
stack), and on FSDP2 (train/deepspeed.py's mapping) elsewhere. This module is imported only when the engine
runs. On a CPU the engine runs only when asked for (LMFORGE_DEEPSPEED_ENGINE=1): DeepSpeed's CPU accelerator
trains over gloo, which is how the tests prove the same code that runs on CUDA, and how Intel-CPU users run it.
lmforge keeps its own learning-rate schedule (set each step with set_lr), so a ds_config scheduler is dropped.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

# "1": run DeepSpeed's engine on a CPU (DeepSpeed's CPU accelerator, gloo); "0": never run it, even on CUDA.
ENGINE_ENV = "LMFORGE_DEEPSPEED_ENGINE"
# The tag (subdirectory) a checkpoint's DeepSpeed files go under, inside the directory the caller gives.
CHECKPOINT_TAG = "deepspeed"
_PRECISIONS = ("bf16", "bfloat16", "fp16")
# The key the caller's client_state is saved under: DeepSpeed returns its own keys beside it on load.
_CLIENT_KEY = "lmforge"


def engine_wanted(ds_config: dict, device_type: str) -> tuple[bool, str]:
    """(whether DeepSpeed's engine runs this ds_config on `device_type`, why or why not, for the notice).

    Why: CUDA with DeepSpeed importable runs the engine; a CPU runs it only on request (LMFORGE_DEEPSPEED_ENGINE=1):
    DeepSpeed's CPU accelerator trains, but builds C++ ops on first use, so the FSDP2 mapping stays the CPU
    default; LMFORGE_DEEPSPEED_ENGINE=0 keeps the FSDP2 mapping even on CUDA.
    """
    switch = os.environ.get(ENGINE_ENV, "")
    if importlib.util.find_spec("deepspeed") is None:
        return False, "DeepSpeed is not installed"
    if switch == "0":
        return False, f"{ENGINE_ENV}=0"
    if device_type == "cuda":
        return True, "CUDA"
    if switch == "1":
        nvme = [k for k in ("offload_optimizer", "offload_param")
                if ((ds_config.get("zero_optimization") or {}).get(k) or {}).get("device") == "nvme"]
        if nvme:
            return False, f"zero_optimization.{nvme[0]}.device=nvme is not run on a {device_type} here"
        return True, f"{ENGINE_ENV}=1 on {device_type}"
    return False, f"no CUDA device (set {ENGINE_ENV}=1 to run it on the {device_type})"


def complete_config(ds_config: dict, tc, world_size: int, precision: str) -> tuple[dict, list[str]]:
    """(the ds_config DeepSpeed is given, what lmforge filled in or dropped, one phrase each).

    Why: "auto" and missing batch, accumulation, clipping and precision keys take train.*'s values (the values
    merge_deepspeed already mapped from this JSON), the scheduler is dropped because lmforge sets the learning
    rate each step, and the optimizer is built by lmforge (AdamW from train.*, no decay on norms and embeddings).
    """
    ds = copy.deepcopy(ds_config)
    filled: list[str] = []
    for key, value in (("train_micro_batch_size_per_gpu", tc.micro_batch_size),
                       ("gradient_accumulation_steps", tc.grad_accum), ("gradient_clipping", tc.grad_clip)):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
            filled.append(f"{key}={value}")
    if ds.get("train_batch_size", "auto") == "auto":
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
    enabled = {name: (ds.get(name) or {}).get("enabled", False) for name in _PRECISIONS}
    if not any(v is True for v in enabled.values()):
        for name in _PRECISIONS:
            if name in ds:
                ds[name] = {**ds[name], "enabled": False}
        if precision in ("bf16", "fp16"):
            ds[precision] = {**(ds.get(precision) or {}), "enabled": True}
        filled.append(f"precision={precision}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            del ds[key]
    filled.append(f"optimizer=AdamW(lr={tc.lr}, betas=({tc.beta1}, {tc.beta2}), eps={tc.eps}, "
                  f"weight_decay={tc.weight_decay}) from train.*")
    filled.append(f"scheduler dropped (lmforge sets the learning rate each step: {tc.schedule})")
    ds.setdefault("steps_per_print", None)  # lmforge logs each step itself
    return ds, filled


def offloads_optimizer(ds_config: dict) -> bool:
    """Whether the ds_config keeps optimizer state on the CPU (ZeRO-Offload), which needs DeepSpeedCPUAdam."""
    return ((ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}).get("device") == "cpu"


def initialize(model, tc, ds_config: dict, rt, precision: str):
    """DeepSpeed's engine for `model` under the completed ds_config, on torchrun's process group (gloo or NCCL).

    Why: the optimizer is ours (AdamW with lmforge's parameter groups; DeepSpeedCPUAdam in AdamW mode when the
    optimizer is offloaded, as ZeRO-Offload requires), so what is trained is what train.* says.
    """
    if rt.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would pick CUDA wherever it sees one
    if not rt.distributed and "MASTER_PORT" not in os.environ:
        _one_process_env()
    import deepspeed
    import torch

    from lmforge.model.llama import LeanLlama
    from lmforge.train.optim import build_adamw, param_groups

    ds, _ = complete_config(ds_config, tc, rt.world_size, precision)
    dtype = torch.bfloat16 if (ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled") is True else \
        torch.float16 if (ds.get("fp16") or {}).get("enabled") is True else None
    if dtype is not None and isinstance(model, LeanLlama):
        _cast_float_buffers(model, dtype)
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2),
                                     eps=tc.eps, adamw_mode=True)
    else:
        optimizer = build_adamw(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps, rt.device)
    engine, _, _, _ = deepspeed.initialize(model=model.to(rt.device), optimizer=optimizer, config=ds)
    engine.checkpoint_engine.load = read_checkpoint_file  # every checkpoint read of DeepSpeed's goes through it
    return engine


def read_checkpoint_file(path, map_location=None):
    """One of DeepSpeed's checkpoint files, read with torch.load(weights_only=True) admitting its own plain records.

    Why: DeepSpeed unpickles its checkpoint files in full, which runs whatever code a planted file names;
    lmforge loads no such pickle. Its files hold tensors plus these four record types (ZeRO stages 1-3,
    bf16/fp16, optimizer offload), which carry data and no behaviour on load.
    """
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def _one_process_env() -> None:
    """torchrun's variables for a run of one process started without it: DeepSpeed needs a process group, and
    without these it looks for MPI instead."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _cast_float_buffers(model, dtype) -> None:
    """LeanLlama's RoPE tables and mask in the engine's dtype: DeepSpeed casts parameters, not buffers, and the
    lean model rotates in its tables' dtype (as it does under autocast, where it casts them itself)."""
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)


def set_lr(engine, lr: float) -> None:
    """Set the learning rate of every parameter group before a step; lmforge's schedule, not DeepSpeed's."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr


def backward(engine, loss) -> None:
    """Backward of one micro-batch's mean loss (DeepSpeed divides it by the accumulation steps itself).

    Why: DeepSpeed counts micro-batches in engine.step(); before the last one of an optimizer step it only
    advances that count, so update() is the one call that applies the step.
    """
    engine.backward(loss)
    if not engine.is_gradient_accumulation_boundary():
        engine.step()


def skips_on_device(engine) -> bool:
    """Whether update() can skip a finite step: the optimizer DeepSpeed steps is a fused torch AdamW.

    Why: DeepSpeed has no skip of its own for a finite gradient (lmforge's loss-spike guard); a fused AdamW takes
    the verdict as `found_inf` and leaves parameters, moments and step count as they were. DeepSpeedCPUAdam
    (optimizer offload) does not, so there a spike cannot be skipped.
    """
    import torch

    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return isinstance(inner, torch.optim.AdamW) and bool(inner.defaults.get("fused"))


def update(engine, skip=None) -> tuple[float, bool]:
    """Apply the optimizer step after the last micro-batch: (the global grad norm before clipping, whether DeepSpeed applied it).

    Why: DeepSpeed clips and steps in one call, and skips a step with a non-finite gradient itself (the norm is
    then inf); `skip`, a 0-d tensor (nonzero: skip), is lmforge's guard verdict, taken on the device by a fused
    AdamW (skips_on_device) so no host read is needed; DeepSpeed still reports such a step as applied.
    """
    if not engine.is_gradient_accumulation_boundary():
        raise RuntimeError(f"deepspeed: update() after {engine.micro_steps % engine.gradient_accumulation_steps()} "
                           f"micro-batches; the engine was built for {engine.gradient_accumulation_steps()}")
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    if skip is not None:
        if not skips_on_device(engine):
            raise RuntimeError(f"deepspeed: {type(inner).__name__} cannot skip a step (a fused torch AdamW can); "
                               "call update() without skip")
        inner.found_inf = (skip != 0).float().to(engine.device)  # where the fp32 partitions it steps live
    try:
        engine.step()
    finally:
        if skip is not None:
            del inner.found_inf
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan"), bool(engine.was_step_applied())


def save(engine, directory: Path | str, client_state: dict) -> None:
    """Save the engine (sharded model, optimizer, ZeRO partitions) and `client_state` under `directory`; every rank calls it.

    Why: each rank writes its own partition, so no rank gathers the model; DeepSpeed's zero_to_fp32.py lands
    in `directory` too, for a full fp32 model offline.
    """
    engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, client_state={_CLIENT_KEY: client_state},
                           save_latest=True)


def load(engine, directory: Path | str) -> dict:
    """Load a checkpoint that save() wrote into `engine` and return the client_state given to save(); every rank calls it.

    Why: resuming on the same number of processes restores each rank's partitions as saved; another number of
    processes needs DeepSpeed's universal checkpoint (ds_to_universal), which this does not convert.
    """
    from lmforge.config import ConfigError

    path = Path(directory) / CHECKPOINT_TAG
    if not path.is_dir():
        raise ConfigError(f"deepspeed: {directory} holds no DeepSpeed checkpoint ({path} is missing)")
    saved = sorted(path.glob("*optim_states.pt")) or sorted(path.glob("*model_states.pt"))
    stage = engine.zero_optimization_stage()
    if stage > 0 and len(saved) != engine.dp_world_size:
        raise ConfigError(f"deepspeed: {directory} was saved by {len(saved)} processes and this run has "
                          f"{engine.dp_world_size}; resume with {len(saved)} (ZeRO partitions are per process)")
    try:
        loaded, client_state = engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
    except pickle.UnpicklingError as e:
        refused = next((line for line in str(e).splitlines() if "GLOBAL" in line), "not tensors and plain records")
        raise ConfigError(f"deepspeed: {path} holds a pickle lmforge does not load ({refused.strip()})") from None
    if loaded is None:
        raise ConfigError(f"deepspeed: could not load the checkpoint in {path}")
    return (client_state or {}).get(_CLIENT_KEY, {})


def full_state_dict(engine) -> dict:
    """The whole model's state dict in fp32 on the CPU (DeepSpeed's fp32 master weights), on every rank.

    Why: HF export at the end of a run wants full weights, and under ZeRO each rank holds only a partition;
    every rank must call it (each parameter is gathered by a collective), tied weights stay one tensor.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    full: dict[int, Any] = {}
    out: dict[str, Any] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) not in full:
            value = safe_get_full_fp32_param(p) if p.requires_grad else None
            if value is None:  # frozen (or not managed by the optimizer): the module's own copy, gathered
                with deepspeed.zero.GatheredParameters([p], enabled=hasattr(p, "ds_id")):
                    value = p.data.float()
            full[id(p)] = value.detach().cpu().float().clone()
        out[name] = full[id(p)]
    for mod_name, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf.detach().cpu()
    return out
