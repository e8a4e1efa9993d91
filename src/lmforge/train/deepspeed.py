"""A DeepSpeed ds_config mapped onto train.* keys (FSDP2's equivalents), and the one line that says what was mapped.

Why: the guide's stack is DeepSpeed ZeRO and users arrive with its ds_config.json. lmforge trains with FSDP2,
so each setting is either mapped onto our keys or named as not mapped: none is ignored silently. "auto"
values keep ours. No torch import here: configs are validated before any heavy import.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError

# Top-level keys taken apart below; every other key is reported as not mapped.
_HANDLED = {"zero_optimization", "bf16", "bfloat16", "fp16", "gradient_accumulation_steps",
            "train_micro_batch_size_per_gpu", "train_batch_size", "gradient_clipping", "optimizer", "scheduler",
            "steps_per_print"}
_OFFLOAD_KEYS = ("offload_optimizer", "offload_param")


def load_ds_config(value: Path | str | dict) -> tuple[dict, str]:
    """The ds_config mapping and a name for it (the JSON file's path, or "inline")."""
    if isinstance(value, dict):
        return value, "inline"
    path = Path(value)
    try:
        ds = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"deepspeed: cannot read {path} ({e.strerror}); give a ds_config JSON file or a mapping") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed: {path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed: {path}: the top level must be a JSON object")
    return ds, str(path)


def map_ds_config(ds: dict, world_size: int = 1) -> tuple[dict[str, Any], list[str], list[str]]:
    """(train.* overrides, mapped settings as "ds key -> train.key=value", ds keys not mapped) for a ds_config.

    `world_size` (processes) splits DeepSpeed's global train_batch_size into micro-batch and accumulation.
    Settings with no FSDP2 equivalent that would change what is trained (nvme offload, an optimizer or
    scheduler other than Adam(W) and the Warmup* family, fp16 and bf16 together) are one-line errors.
    """
    out: dict[str, Any] = {}
    mapped: list[str] = []
    not_mapped: list[str] = []

    def put(ds_key: str, value: Any, train_key: str, convert=lambda v: v) -> None:
        if value == "auto":
            mapped.append(f"{ds_key}=auto -> ours")
            return
        out[train_key] = convert(value)
        mapped.append(f"{ds_key} -> train.{train_key}={_show(out[train_key])}")

    for key in ds:
        if key not in _HANDLED:
            not_mapped.append(key)
    _map_zero(_section(ds, "zero_optimization"), out, mapped, not_mapped)
    _map_precision(ds, out, mapped, not_mapped)
    _map_batch(ds, world_size, put, mapped)
    if "gradient_clipping" in ds:
        put("gradient_clipping", ds["gradient_clipping"], "grad_clip", lambda v: _number("gradient_clipping", v))
    if "steps_per_print" in ds:
        put("steps_per_print", ds["steps_per_print"], "log_every", lambda v: _int("steps_per_print", v))
    peak_lr = _map_optimizer(_section(ds, "optimizer"), put, not_mapped)
    _map_scheduler(_section(ds, "scheduler"), peak_lr, put, not_mapped)
    return out, mapped, not_mapped


def _map_zero(zero: dict, out: dict, mapped: list[str], not_mapped: list[str]) -> None:
    """ZeRO stage -> train.parallel (0/1: ddp, 2: fsdp keeping gathered parameters, 3: fsdp); cpu offload -> cpu_offload."""
    stage = zero.get("stage")
    if stage is not None:
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise ConfigError(f"deepspeed: zero_optimization.stage must be 0, 1, 2 or 3 (got {stage!r})")
        out["parallel"] = "ddp" if stage < 2 else "fsdp"
        unsharded = " (optimizer state not sharded)" if stage == 1 else ""
        mapped.append(f"zero_optimization.stage={stage} -> train.parallel={out['parallel']}{unsharded}")
        if stage == 2:
            out["reshard_after_forward"] = False
            mapped.append("zero_optimization.stage=2 -> train.reshard_after_forward=false")
    for key in _OFFLOAD_KEYS:
        offload = _section(zero, key, f"zero_optimization.{key}")
        device = offload.get("device", "none" if offload else None)
        if device is None:
            continue
        if device == "cpu":
            if out.get("parallel") != "fsdp":
                raise ConfigError(f"deepspeed: zero_optimization.{key}.device=cpu needs zero_optimization.stage 2 or 3 "
                                  f"here (FSDP2 offloads sharded state; got stage {stage!r})")
            out["cpu_offload"] = True
            mapped.append(f"zero_optimization.{key}.device=cpu -> train.cpu_offload=true")
        elif device == "none":
            mapped.append(f"zero_optimization.{key}.device=none (no offload)")
        else:
            raise ConfigError(f"deepspeed: zero_optimization.{key}.device={device} has no FSDP2 equivalent "
                              "(cpu or none)")
        not_mapped += [f"zero_optimization.{key}.{k}" for k in offload if k != "device"]
    not_mapped += [f"zero_optimization.{k}" for k in zero if k != "stage" and k not in _OFFLOAD_KEYS]


def _map_precision(ds: dict, out: dict, mapped: list[str], not_mapped: list[str]) -> None:
    """bf16/fp16 sections -> train.precision (fp32 when a section is there and neither is enabled)."""
    names = [n for n in ("bf16", "bfloat16", "fp16") if n in ds]
    if not names:
        return
    enabled = {}
    for name in names:
        section = _section(ds, name)
        enabled[name] = section.get("enabled", False)
        not_mapped += [f"{name}.{k}" for k in section if k != "enabled"]
    on = [n for n, v in enabled.items() if v is True]
    if len(on) > 1:
        raise ConfigError(f"deepspeed: {' and '.join(on)} are both enabled; enable one")
    if "auto" in enabled.values() and not on:
        mapped.append(f"{'/'.join(names)}.enabled=auto -> ours")
        return
    out["precision"] = "fp16" if on == ["fp16"] else "bf16" if on else "fp32"
    mapped.append(f"{'/'.join(names)}.enabled -> train.precision={out['precision']}")


def _map_batch(ds: dict, world_size: int, put, mapped: list[str]) -> None:
    """Micro-batch and accumulation; a global train_batch_size is checked against them, or split into them
    as DeepSpeed does (a missing one is derived; neither given: accumulation 1)."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    micro = micro if micro in (None, "auto") else _int("train_micro_batch_size_per_gpu", micro)
    accum = accum if accum in (None, "auto") else _int("gradient_accumulation_steps", accum)
    if total == "auto":
        mapped.append("train_batch_size=auto -> ours")
    elif total is not None:
        total = _int("train_batch_size", total)
        if "auto" in (micro, accum):
            raise ConfigError(f"deepspeed: train_batch_size {total} cannot be split with an \"auto\" micro-batch or "
                              "accumulation; give numbers, or make train_batch_size auto")
        if micro is not None and accum is not None:
            if micro * accum * world_size != total:
                raise ConfigError(f"deepspeed: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} x "
                                  f"gradient_accumulation_steps {accum} x {world_size} processes")
        else:
            given = micro or accum or 1
            if total % (given * world_size):
                raise ConfigError(f"deepspeed: train_batch_size {total} is not a multiple of {given} x {world_size} "
                                  "processes")
            other = total // (given * world_size)
            micro, accum = (micro, other) if micro is not None else (other, given)
        mapped.append(f"train_batch_size={total} (= micro-batch x accumulation x {world_size} processes)")
    if micro is not None:
        put("train_micro_batch_size_per_gpu", micro, "micro_batch_size")
    if accum is not None:
        put("gradient_accumulation_steps", accum, "grad_accum")


def _map_optimizer(opt: dict, put, not_mapped: list[str]) -> Any:
    """Adam/AdamW (decoupled weight decay) -> our AdamW's lr, betas, eps, weight_decay; returns its lr (or None)."""
    if not opt:
        return None
    kind = str(opt.get("type", "")).lower()
    params = _section(opt, "params", "optimizer.params")
    if kind not in ("adam", "adamw"):
        raise ConfigError(f"deepspeed: optimizer.type={opt.get('type')!r} has no equivalent here; lmforge trains "
                          "with AdamW (use Adam or AdamW)")
    if kind == "adam" and params.get("adam_w_mode", True) is False:
        raise ConfigError("deepspeed: optimizer Adam with adam_w_mode=false (L2 decay) has no equivalent here; "
                          "lmforge trains with AdamW")
    if "lr" in params:
        put("optimizer.params.lr", params["lr"], "lr", lambda v: _number("optimizer.params.lr", v))
    if "betas" in params:
        betas = params["betas"]
        if betas == "auto":
            put("optimizer.params.betas", betas, "beta1")
        else:
            if not (isinstance(betas, list) and len(betas) == 2):
                raise ConfigError(f"deepspeed: optimizer.params.betas must be [beta1, beta2] (got {betas!r})")
            put("optimizer.params.betas[0]", betas[0], "beta1", lambda v: _number("optimizer.params.betas", v))
            put("optimizer.params.betas[1]", betas[1], "beta2", lambda v: _number("optimizer.params.betas", v))
    for key, train_key in (("eps", "eps"), ("weight_decay", "weight_decay")):
        if key in params:
            put(f"optimizer.params.{key}", params[key], train_key, lambda v, k=key: _number(f"optimizer.params.{k}", v))
    not_mapped += [f"optimizer.params.{k}" for k in params if k not in ("lr", "betas", "eps", "weight_decay", "adam_w_mode")]
    not_mapped += [f"optimizer.{k}" for k in opt if k not in ("type", "params")]
    return params.get("lr")


def _map_scheduler(sched: dict, peak_lr: Any, put, not_mapped: list[str]) -> None:
    """WarmupLR -> constant; WarmupDecayLR -> linear to warmup_min_lr; WarmupCosineLR -> cosine (all with linear warmup)."""
    if not sched:
        return
    kind = sched.get("type")
    params = _section(sched, "params", "scheduler.params")
    shapes = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}
    if kind not in shapes:
        raise ConfigError(f"deepspeed: scheduler.type={kind!r} has no equivalent here (WarmupLR, WarmupDecayLR or "
                          "WarmupCosineLR)")
    put("scheduler.type", kind, "schedule", lambda v: shapes[v])
    handled = {"warmup_num_steps", "total_num_steps", "warmup_max_lr", "warmup_min_lr", "cos_min_ratio"}
    if "warmup_num_steps" in params:
        put("scheduler.params.warmup_num_steps", params["warmup_num_steps"], "warmup_steps",
            lambda v: _int("scheduler.params.warmup_num_steps", v, minimum=0))
    if "total_num_steps" in params:
        put("scheduler.params.total_num_steps", params["total_num_steps"], "decay_steps",
            lambda v: _int("scheduler.params.total_num_steps", v))
    if "warmup_max_lr" in params:
        put("scheduler.params.warmup_max_lr", params["warmup_max_lr"], "lr",
            lambda v: _number("scheduler.params.warmup_max_lr", v))
        peak_lr = params["warmup_max_lr"]
    floor = params.get("warmup_min_lr", 0.0)
    if kind == "WarmupDecayLR":  # decays to warmup_min_lr
        put("scheduler.params.warmup_min_lr", floor, "min_lr", lambda v: _number("scheduler.params.warmup_min_lr", v))
    elif kind == "WarmupLR" and floor not in (0, 0.0, "auto"):  # our warmup starts near 0, not at warmup_min_lr
        not_mapped.append("scheduler.params.warmup_min_lr")
    elif "cos_min_ratio" in params:
        if peak_lr in (None, "auto") or params["cos_min_ratio"] == "auto":
            not_mapped.append("scheduler.params.cos_min_ratio")
        else:
            put("scheduler.params.cos_min_ratio", params["cos_min_ratio"], "min_lr",
                lambda v: _number("scheduler.params.cos_min_ratio", v) * _number("lr", peak_lr))
    if params.get("warmup_type", "log") != "linear":  # DeepSpeed's default warmup is logarithmic; ours is linear
        not_mapped.append(f"scheduler.params.warmup_type={params.get('warmup_type', 'log')}")
    not_mapped += [f"scheduler.params.{k}" for k in params if k not in handled | {"warmup_type"}]
    not_mapped += [f"scheduler.{k}" for k in sched if k not in ("type", "params")]


def _section(parent: dict, key: str, name: str | None = None) -> dict:
    value = parent.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"deepspeed: {name or key} must be a mapping (got {value!r})")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"deepspeed: {key} must be a number or \"auto\" (got {value!r})")
    return float(value)


def _int(key: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"deepspeed: {key} must be an integer >= {minimum} or \"auto\" (got {value!r})")
    return value


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def merge_deepspeed(data: Any, world_size: int) -> Any:
    """A raw Pretrain/Finetune config tree with its `deepspeed` ds_config mapped into `train`.

    A train.* key set explicitly to a different value than the ds_config's is an error (one line naming
    both): a silent winner either way would surprise someone. The same value given twice is fine, so a
    run's written config.yaml (which holds both) loads again.
    """
    if not isinstance(data, dict) or data.get("deepspeed") is None:
        return data
    ds, name = load_ds_config(data["deepspeed"])
    overrides, _, _ = map_ds_config(ds, world_size)
    train = data.get("train") or {}
    if hasattr(train, "model_fields_set"):  # a TrainConfig built in Python: only the keys it was given count
        train = {k: getattr(train, k) for k in train.model_fields_set}
    if not isinstance(train, dict):
        return data
    for key, value in overrides.items():
        if key in train and train[key] != value:
            raise ConfigError(f"train.{key}={_show(train[key])} conflicts with deepspeed {name} (which maps to "
                              f"{_show(value)}); drop one of them")
    return {**data, "train": {**train, **overrides}}


def deepspeed_notice(value: Path | str | dict, world_size: int, device_type: str | None = None,
                     not_here: str | None = None) -> str:
    """One line: which engine runs the ds_config and, under FSDP2, what was mapped onto train.* and what was not.

    `device_type` is the run's device ("cuda" when CUDA is available if not given); `not_here` is why this job
    does not run on DeepSpeed's engine even where engine_wanted says it would (LoRA adapters), None when it does.
    """
    return deepspeed_plan(value, world_size, device_type, not_here)[1]


def deepspeed_plan(value: Path | str | dict, world_size: int, device_type: str | None = None,
                   not_here: str | None = None) -> tuple[dict | None, str]:
    """(the ds_config when DeepSpeed's engine runs it, else None: FSDP2 runs the mapping; the one-line notice)."""
    ds, name = load_ds_config(value)
    _, mapped, not_mapped = map_ds_config(ds, world_size)
    wanted, why = _wanted(ds, device_type, not_here)
    if wanted:
        return ds, f"deepspeed: {name} runs on DeepSpeed's engine ({engine_summary(ds)}; {why}); {lmforge_sets(ds)}"
    return None, (f"deepspeed: {name} mapped to FSDP2 (DeepSpeed's engine is not used: {why}); mapped: "
                  f"{', '.join(mapped) or 'nothing'}; not mapped: {', '.join(not_mapped) or 'nothing'}")


def _wanted(ds: dict, device_type: str | None, not_here: str | None) -> tuple[bool, str]:
    from lmforge.train.deepspeed_engine import engine_wanted

    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    wanted, why = engine_wanted(ds, device_type)
    if wanted and not_here:
        return False, not_here
    return wanted, why


def engine_summary(ds: dict) -> str:
    """ "ZeRO-3, optimizer offload cpu, bf16" and the like: what DeepSpeed's engine is asked to run."""
    zero = _section(ds, "zero_optimization")
    parts = [f"ZeRO-{zero.get('stage', 0)}"]
    for key, what in (("offload_optimizer", "optimizer"), ("offload_param", "parameter")):
        device = _section(zero, key, f"zero_optimization.{key}").get("device", "none")
        if device != "none":
            parts.append(f"{what} offload {device}")
    on = [n for n in ("bf16", "bfloat16", "fp16") if _section(ds, n).get("enabled") is True]
    auto = [n for n in ("bf16", "bfloat16", "fp16") if _section(ds, n).get("enabled") == "auto"]
    parts.append("bf16" if on in (["bf16"], ["bfloat16"]) else "fp16" if on == ["fp16"] else
                 "precision from train.precision" if auto or not any(n in ds for n in ("bf16", "bfloat16", "fp16"))
                 else "fp32")
    return ", ".join(parts)


def lmforge_sets(ds: dict) -> str:
    """What lmforge sets in the ds_config DeepSpeed is given: "auto" and missing values, optimizer, scheduler."""
    keys = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
    filled = [k for k in keys if ds.get(k, "auto") == "auto"]
    parts = [f"from train.*: {', '.join(filled)}"] if filled else []
    opt = "its optimizer's values" if ds.get("optimizer") else "train.lr, beta1, beta2, eps, weight_decay"
    offload = _section(_section(ds, "zero_optimization"), "offload_optimizer").get("device") == "cpu"
    name = "DeepSpeedCPUAdam in AdamW mode (optimizer offload)" if offload else "lmforge's AdamW"
    parts.append(f"optimizer: {name} with lmforge's parameter groups, from {opt}")
    parts.append("scheduler dropped (lmforge sets the learning rate each step)" if ds.get("scheduler") else
                 "learning rate: lmforge's train.schedule, set each step")
    return "lmforge sets " + "; ".join(parts)
