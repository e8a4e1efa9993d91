"""`lmforge plan memory`: per-device memory of a training or serving job, whether it fits, and what would make it.

The job comes from the same config a stage trains with (pretrain, finetune, align), or from --model and --method;
the numbers come from lmforge.model.memory's formulas, so nothing is built and torch is not imported.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from lmforge.config import ConfigError, validate
from lmforge.errors import UserError
from lmforge.model.memory import GB, LORA_MODULES, ModelShape, TrainSetup, serving_memory, training_memory

DEFAULT_VOCAB = 32000  # Llama-2's, for a preset whose vocabulary would come from token shards that are not there
FSDP_DEGREES = (2, 4, 8, 16, 32, 64)


class PlanError(UserError):
    """A plan that cannot be made from its input (unknown device, model or config key)."""


@dataclass(frozen=True)
class Device:
    name: str
    capacity: float  # bytes the device reports (nvidia-smi's total; the machine's RAM for cpu)
    cuda: bool


def _ram_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


MIB = 1024 ** 2
DEVICES = {d.name: d for d in (
    Device("a100-40gb", 40960 * MIB, True), Device("a100-80gb", 81920 * MIB, True),
    Device("h100-80gb", 81559 * MIB, True), Device("h200-141gb", 143771 * MIB, True),
    Device("l4-24gb", 23034 * MIB, True), Device("rtx4090-24gb", 24564 * MIB, True),
    Device("cpu", _ram_bytes(), False))}


def cpu_has_bf16() -> bool:
    """This CPU's native bf16 (AVX512-BF16 or AMX), read from /proc/cpuinfo so torch need not be imported."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# ---- the job from a config -------------------------------------------------------------------------------------

@dataclass
class Job:
    """What the formulas need: the model's shape, the training setup (None: serving), and where they came from."""

    shape: ModelShape
    setup: TrainSetup | None
    precision: str  # as configured: auto, bf16, fp16, fp32
    model_name: str
    stage: str
    max_batch: int = 0
    max_model_len: int = 0


def _stage(extra: dict) -> tuple[str, type]:
    """The stage a config belongs to, by its keys, and that stage's config model."""
    if "algorithm" in extra:
        from lmforge.align.config import AlignConfig
        return "align", AlignConfig
    if "base_model" in extra:
        from lmforge.train.config import FinetuneConfig
        return "finetune", FinetuneConfig
    from lmforge.train.config import PretrainConfig
    return "pretrain", PretrainConfig


def _section(model_cls: type, name: str, value):
    """A config section validated by the stage's own model for it (unknown keys are errors naming the key)."""
    ann = model_cls.model_fields[name].annotation
    cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and hasattr(a, "model_fields")),
               ann)
    try:
        return validate(cls, value or {})
    except ConfigError as e:
        raise ConfigError(f"{name}.{e}") from None


def shape_of(source: str) -> tuple[ModelShape, str]:
    """A model's shape from a preset name, an HF directory (config.json), a .gguf file or the smollm2 alias."""
    from lmforge.model.config import PRESETS, ModelConfig

    if source in PRESETS:
        return ModelShape.from_config(ModelConfig(preset=source, vocab_size=DEFAULT_VOCAB)), f"preset {source}"
    from lmforge.model.load import resolve

    r = resolve(source)  # a ModelLoadError (one line) when it is no model
    r = r.base or r  # an adapter: its base model's shape
    if r.kind == "hf_dir":
        return ModelShape.from_hf(json.loads(Path(r.path, "config.json").read_text())), source
    if r.kind == "gguf":
        return _gguf_shape(r.path), source
    raise PlanError(f"model {source!r}: a hub id is not read by the planner (it does not download); give a "
                    f"preset ({', '.join(PRESETS)}), an HF directory, a .gguf file or a run directory")


def _gguf_shape(path: str) -> ModelShape:
    """Read a GGUF file's header (the gguf package memory-maps it; no weights are read)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PlanError(f"{path}: reading a .gguf needs the gguf package (pip install gguf)") from None
    reader = GGUFReader(path)
    arch = _gguf_value(reader, "general.architecture")

    def get(key):
        return _gguf_value(reader, f"{arch}.{key}")

    heads = int(get("attention.head_count"))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    d = int(get("embedding_length"))
    return ModelShape(vocab, d, int(get("block_count")), heads, int(get("attention.head_count_kv") or heads),
                      int(get("feed_forward_length")), tied, d // heads)


def _gguf_value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode() if field.types and field.types[0].name == "STRING" else part[0]


def job_from(cfg) -> Job:
    """The job a `plan memory` config describes: a stage config's keys, or --model and --method alone."""
    extra = dict(cfg.model_extra or {})
    serving = cfg.max_batch is not None or cfg.max_model_len is not None
    if isinstance(cfg.model, str) and "base_model" not in extra:
        # --model alone: a fine-tuning job of that model with FinetuneConfig's defaults and any of its sections
        from lmforge.train.config import FinetuneConfig
        unknown = sorted(set(extra) - {"train", "data", "lora", "qlora"})
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key with --model (expected train, data, lora or qlora)")
        extra = {**extra, "base_model": cfg.model, "method": cfg.method or "full"}
        model_cls, stage = FinetuneConfig, "finetune"
    elif not extra and cfg.model is None:
        raise PlanError("plan memory needs a CONFIG.yaml (pretrain, finetune or align) or --model PRESET|MODEL")
    else:
        if cfg.model is not None:
            extra["model"] = cfg.model
        stage, model_cls = _stage(extra)
        unknown = sorted(set(extra) - set(model_cls.model_fields))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key for a {stage} config (expected one of "
                              f"{', '.join(model_cls.model_fields)})")
    tc = _section(model_cls, "train", extra.get("train"))
    data = extra.get("data") or {}
    if stage == "pretrain":
        from lmforge.model.config import ModelConfig
        mc = _section(model_cls, "model", extra.get("model"))
        name = f"preset {mc.preset}" if mc.preset else "model"
        if mc.vocab_size is None:
            vocab, source = _shard_vocab(data.get("dir"))
            mc = ModelConfig(**{**mc.model_dump(), "vocab_size": vocab})
            name += f" (vocab {vocab} {source})"
        shape, impl = ModelShape.from_config(mc), mc.impl
        seq_len = data.get("seq_len") or mc.max_seq_len
        method, lora, double_quant, rows = cfg.method or "full", None, True, 1
    else:
        shape, name = shape_of(extra["base_model"])
        impl = "hf"
        data_cls = model_cls.model_fields["data"].annotation
        seq_len = data.get("max_length", data_cls.model_fields["max_length"].default)
        method = cfg.method or extra.get("method") or model_cls.model_fields["method"].default
        lora = _section(model_cls, "lora", extra.get("lora"))
        double_quant = _section(model_cls, "qlora", extra.get("qlora")).double_quant
        rows = 2 if extra.get("algorithm") in ("dpo", "reward") else 1  # chosen and rejected in one forward
    if serving:
        return Job(shape, None, "auto", name, "serve", cfg.max_batch or 1, cfg.max_model_len or 2048)
    offload = cfg.cpu_offload if cfg.cpu_offload is not None else bool(getattr(tc, "cpu_offload", False))
    if cfg.gpus > 1 and tc.parallel == "none":
        raise PlanError(f"--gpus {cfg.gpus} needs train.parallel=ddp or train.parallel=fsdp")
    lora = lora or _default_lora()
    targets = tuple(k for k in LORA_MODULES if lora.target_modules == "all-linear" or k in lora.target_modules)
    setup = TrainSetup(method=method, micro_batch=tc.micro_batch_size * rows, seq_len=seq_len,
                       grad_accum=tc.grad_accum, grad_checkpointing=tc.grad_checkpointing, impl=impl,
                       parallel=tc.parallel, world_size=cfg.gpus, cpu_offload=offload, lora_r=lora.r,
                       lora_targets=targets, lora_dropout=lora.dropout, double_quant=double_quant)
    return Job(shape, setup, tc.precision, name, stage)


def _default_lora():
    from lmforge.train.config import LoraConfigSection
    return LoraConfigSection()


def _shard_vocab(data_dir) -> tuple[int, str]:
    """The vocabulary of the token shards (their meta.json) when they are there, Llama-2's otherwise; and which."""
    meta = Path(str(data_dir or ""), "meta.json")
    if data_dir and meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"]), f"from {meta}"
    return DEFAULT_VOCAB, "assumed: no token shards at data.dir"


# ---- per device ------------------------------------------------------------------------------------------------

def setup_for(job: Job, device: Device) -> TrainSetup:
    """The job's setup as it would run on `device`: the precision `auto` resolves to, and the attention path."""
    s = job.setup
    precision = job.precision
    if precision == "auto":
        precision = "bf16" if device.cuda or cpu_has_bf16() else "fp32"
    # The lean model uses explicit attention only on CPU under autocast (llama.py); everything else runs SDPA.
    eager = s.impl == "lean" and not device.cuda and precision != "fp32"
    return replace(s, precision=precision, attention="eager" if eager else "sdpa", cuda=device.cuda)


def estimate(job: Job, device: Device):
    if job.setup is None:
        dtype_bytes = 2 if device.cuda else 4  # bf16 on CUDA, fp32 on CPU (device.py's inference policy)
        return serving_memory(job.shape, job.max_batch, job.max_model_len, dtype_bytes, cuda=device.cuda)
    return training_memory(job.shape, setup_for(job, device))


def fits(job: Job, device: Device, setup: TrainSetup | None = None) -> bool:
    e = estimate(replace(job, setup=setup) if setup else job, device)
    return e.total <= device.capacity


def cheapest_fix(job: Job, device: Device) -> str | None:
    """The first change, in order of what it costs (speed, then devices, then quality), that makes the job fit."""
    s = job.setup
    if s is None:
        for batch in _halvings(job.max_batch):
            if estimate(replace(job, max_batch=batch), device).total <= device.capacity:
                return f"--max-batch {batch}"
        return None
    tries: list[tuple[str, TrainSetup]] = []
    for mb in _halvings(s.micro_batch):
        accum = s.grad_accum * s.micro_batch // mb
        tries.append((f"train.micro_batch_size={mb} train.grad_accum={accum} (same global batch)",
                      replace(s, micro_batch=mb, grad_accum=accum)))
    if not s.grad_checkpointing:
        tries.append(("train.grad_checkpointing=true", replace(s, grad_checkpointing=True)))
        tries.append(("train.grad_checkpointing=true train.micro_batch_size=1",
                      replace(s, grad_checkpointing=True, micro_batch=1, grad_accum=s.grad_accum * s.micro_batch)))
    for n in FSDP_DEGREES:
        if s.method != "qlora" and n > s.world_size:
            tries.append((f"train.parallel=fsdp --gpus {n} train.grad_checkpointing=true",
                          replace(s, parallel="fsdp", world_size=n, grad_checkpointing=True)))
    if s.method != "qlora":
        for n in FSDP_DEGREES:
            tries.append((f"train.parallel=fsdp --gpus {n} --cpu-offload train.grad_checkpointing=true",
                          replace(s, parallel="fsdp", world_size=n, cpu_offload=True, grad_checkpointing=True)))
    if s.method == "full":
        tries.append(("--method lora train.grad_checkpointing=true", replace(s, method="lora", grad_checkpointing=True,
                                                                           parallel="none", world_size=1)))
    if s.method != "qlora":
        tries.append(("--method qlora train.grad_checkpointing=true",
                      replace(s, method="qlora", grad_checkpointing=True, parallel="none", world_size=1)))
    for text, setup in tries:
        if setup != s and fits(job, device, setup):
            return text
    return None


def _halvings(n: int) -> list[int]:
    out = []
    while n > 1:
        n //= 2
        out.append(n)
    return out


# ---- output ----------------------------------------------------------------------------------------------------

ROWS = ("weights", "grads", "optimizer", "activations", "buffers", "kv_cache", "overhead")
# The guide's 70B memory table and what each figure is made of, for `--model 70b`.
GUIDE_70B = {
    "full": (280, "4 B/param: bf16 weights and bf16 gradients, or fp32 weights alone",
             "AdamW's two fp32 moments (8 B/param, ~550 GB), fp32 master weights (our engine trains fp32 parameters "
             "under autocast: 4 B, plus 2 B of bf16 casts), activations and the CUDA context"),
    "lora": (145, "bf16 base (2 B/param = 140 GB) plus ~5 GB for adapters and activations",
             "activations at a real sequence length (they grow with micro-batch x sequence), autocast's casts of the "
             "adapters, and the CUDA context; adapters, their gradients and Adam states are indeed small"),
    "qlora": (40, "4-bit base (0.5 B/param = 35 GB) plus ~5 GB",
              "the quantisation constants (~0.13 bit/param with double quantisation, 0.5 bit without), the embedding "
              "and head kept in fp32 by prepare_model_for_kbit_training, and activations, which grow with micro-batch "
              "x sequence and soon outweigh the adapters"),
}


def report(job: Job, device_name: str | None) -> dict:
    """The plan as one JSON-ready object: per catalogue device the rows in GB, the total, and whether it fits."""
    devices = {}
    for name, dev in DEVICES.items():
        e = estimate(job, dev)
        devices[name] = {**e.gb(), "capacity_gb": round(dev.capacity / GB, 2), "fits": e.total <= dev.capacity}
    out = {"model": job.model_name, "params": job.shape.n_params, "stage": job.stage, "devices": devices}
    if job.setup is not None:
        s = job.setup
        out["setup"] = {"method": s.method, "micro_batch": s.micro_batch, "seq_len": s.seq_len,
                        "grad_accum": s.grad_accum, "precision": job.precision,
                        "grad_checkpointing": s.grad_checkpointing, "parallel": s.parallel, "gpus": s.world_size,
                        "cpu_offload": s.cpu_offload}
    else:
        out["setup"] = {"max_batch": job.max_batch, "max_model_len": job.max_model_len}
    if device_name is not None:
        dev = DEVICES[device_name]
        out.update(device=device_name, fits=devices[device_name]["fits"],
                   suggestion=None if devices[device_name]["fits"] else cheapest_fix(job, dev))
        out["notes"] = estimate(job, dev).notes
    return out


def table(job: Job, rep: dict) -> str:
    """The plan as text: one column per device, one row per part, then the verdict and the guide's 70B figure."""
    names = list(DEVICES)
    lines = [f"{job.model_name}: {job.shape.n_params / 1e9:.2f} B params, {job.stage} "
             + " ".join(f"{k}={v}" for k, v in rep["setup"].items())]
    head = f"{'GB per device':<14}" + "".join(f"{n:>13}" for n in names)
    lines += [head, "-" * len(head)]
    for row in ROWS + ("total",):
        values = [rep["devices"][n][f"{row}_gb"] for n in names]
        if row != "total" and not any(values):
            continue
        lines.append(f"{row:<14}" + "".join(f"{v:>13.2f}" for v in values))
    lines.append(f"{'capacity':<14}" + "".join(f"{rep['devices'][n]['capacity_gb']:>13.1f}" for n in names))
    lines.append(f"{'fits':<14}" + "".join(f"{'yes' if rep['devices'][n]['fits'] else 'no':>13}" for n in names))
    if any(rep["devices"][n]["host_gb"] for n in names):
        lines.append(f"{'host (offload)':<14}" + "".join(f"{rep['devices'][n]['host_gb']:>13.2f}" for n in names))
    lines.append("overhead: CUDA context 0.6 GB + 10 % of the tensors for the caching allocator (GPUs only); total "
                 "is the peak (with grad_accum=1 the gradients and the activations are not all alive at once)")
    if "device" in rep:
        verdict = "fits" if rep["fits"] else "does not fit"
        fix = f"; cheapest change that fits: {rep['suggestion']}" if rep.get("suggestion") else ""
        if not rep["fits"] and not rep.get("suggestion"):
            fix = "; no single change in the planner's list makes it fit"
        lines.append(f"{rep['device']}: {verdict}{fix}")
        lines += [f"  {n}" for n in rep["notes"]]
    if job.setup is not None and rep["params"] > 60e9 and job.setup.method in GUIDE_70B:
        figure, what, missing = GUIDE_70B[job.setup.method]
        ours = rep["devices"][rep.get("device") or "h100-80gb"]["total_gb"]
        lines.append(f"guide: 70B {job.setup.method} = {figure} GB, i.e. {what}; ours {ours:,.0f} GB per device. "
                     f"The guide leaves out {missing}.")
    return "\n".join(lines)


def plan_memory_main(cfg) -> int:
    """`lmforge plan memory`: print the table (or --json) for the job `cfg` describes."""
    if cfg.device is not None and cfg.device not in DEVICES:
        raise PlanError(f"--device {cfg.device!r}: unknown device; choose one of {', '.join(DEVICES)}")
    job = job_from(cfg)
    rep = report(job, cfg.device)
    print(json.dumps(rep, indent=2) if cfg.json_out else table(job, rep))
    return 0
