"""`lmforge merge`: mergekit's YAML, read unchanged, merged tensor by tensor from safetensors into an HF directory.

Every input is resolved by the model loader (HF dirs, runs, the GGUF alias; a LoRA adapter or a sharded run is
first exported as a full model into a scratch directory), every header is checked before anything is written
(a tensor missing or of another shape, or a different vocabulary, is a one-line error naming it), and then each
output tensor is read from each input, merged and written before the next one is read: peak memory is a few
tensors plus the current output shard. Parameters resolve as mergekit's do: per-model `parameters` before the
global ones; a list is a gradient interpolated over the layers (t = layer / (layers - 1), 0 outside the layers);
`- filter: NAME` entries pick by substring of the tensor name, the first match wins.
"""
from __future__ import annotations

import filecmp
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from pydantic import TypeAdapter, ValidationError

from lmforge.errors import UserError
from lmforge.model.merge_config import METHOD_NAMES, MergeConfig
from lmforge.model.merge_methods import METHODS, REQUIRED, MethodSpec
from lmforge.model.sharded import SAFE_INDEX

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFE_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
MERGEKIT_KEYS = ("models", "merge_method", "base_model", "parameters", "dtype", "out_dtype", "tokenizer_source")


if tuple(METHODS) != METHOD_NAMES:  # the config validates names without importing torch; the two lists are one
    raise RuntimeError(f"merge_config.METHOD_NAMES {METHOD_NAMES} != merge_methods.METHODS {tuple(METHODS)}")


class MergeError(UserError):
    """A merge that cannot be done as configured; one line naming the key, model or tensor."""


# ---- parameters ---------------------------------------------------------------------------------------------------

def evaluate(setting: Any, tensor: str, t: float, kind: type) -> Any:
    """One parameter's value for `tensor` at layer position `t` (mergekit's evaluate_setting); None: no match."""
    adapter = TypeAdapter(kind)
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return adapter.validate_python(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(isinstance(e, (bool, int, float, str)) for e in setting):
        values = [adapter.validate_python(e) for e in setting]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return adapter.validate_python((1 - frac) * values[i0] + frac * values[i1])
    for cond in setting:
        name = cond.get("filter")
        if name is None or name == "*" or name in tensor:
            return evaluate(cond["value"], tensor, t, kind)
    return None


def _check_setting(key: str, setting: Any, kind: type) -> None:
    """A setting is a scalar, a list of scalars, or filter entries `{filter: NAME, value: ...}`; else one line."""
    entries = [setting] if isinstance(setting, dict) else setting
    if isinstance(entries, list) and entries and all(isinstance(e, dict) for e in entries):
        for i, e in enumerate(entries):
            if "value" not in e or set(e) - {"filter", "value"}:
                raise MergeError(f"{key}[{i}]: a filter entry has `value` and an optional `filter` (got {sorted(e)})")
            _check_setting(f"{key}[{i}].value", e["value"], kind)
        return
    items = entries if isinstance(entries, list) else [entries]
    for item in items:
        if not isinstance(item, (bool, int, float, str)):
            raise MergeError(f"{key}: expected a number, a list of numbers or filter entries, got {item!r}")
        try:
            TypeAdapter(kind).validate_python(item)
        except ValidationError:
            raise MergeError(f"{key}: {item!r} is not a {kind.__name__}") from None


def _check_parameters(cfg: MergeConfig, spec: MethodSpec) -> None:
    """Every parameter key is one the method takes, and every value parses; before anything is read."""
    allowed = {**spec.shared, **spec.per_model}
    for key, value in (cfg.parameters or {}).items():
        if key not in allowed:
            raise MergeError(f"parameters.{key}: unknown parameter for {cfg.merge_method} "
                             f"(it takes {', '.join(allowed) or 'none'})")
        _check_setting(f"parameters.{key}", value, allowed[key][0])
    for i, m in enumerate(cfg.models):
        for key, value in (m.parameters or {}).items():
            if key not in spec.per_model:
                raise MergeError(f"models[{i}].parameters.{key}: unknown per-model parameter for {cfg.merge_method} "
                                 f"(it takes {', '.join(spec.per_model) or 'none'})")
            _check_setting(f"models[{i}].parameters.{key}", value, spec.per_model[key][0])


def _resolve(name: str, kind: type, default: Any, scopes: list[dict | None], tensor: str, t: float, where: str) -> Any:
    for scope in scopes:
        if scope and name in scope:
            value = evaluate(scope[name], tensor, t, kind)
            if value is not None:
                return value
    if default is REQUIRED:
        raise MergeError(f"missing parameter {name!r} for {where} tensor {tensor}: set it in the model's "
                         f"`parameters` or the global ones")
    return default


# ---- inputs -------------------------------------------------------------------------------------------------------

class Source:
    """One input model as local safetensors: where each tensor lives, and its shape and dtype from the headers."""

    def __init__(self, spec: str, directory: Path):
        from safetensors import safe_open

        self.spec, self.dir = spec, directory
        index = directory / SAFE_INDEX
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (directory / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise MergeError(f"{spec}: no safetensors weights in {directory} (export it with `lmforge export`)")
        self.where: dict[str, Path] = {}
        self.header: dict[str, tuple[list[int], str]] = {}
        for f in files:
            with safe_open(str(directory / f), "pt") as st:
                for name in st.keys():
                    piece = st.get_slice(name)
                    self.where[name] = directory / f
                    self.header[name] = (list(piece.get_shape()), piece.get_dtype())

    def read(self, name: str) -> torch.Tensor:
        """One tensor, read with the file opened for it alone (no mapping stays resident between tensors)."""
        from safetensors import safe_open

        with safe_open(str(self.where[name]), "pt") as st:
            return st.get_tensor(name)

    def config(self) -> dict:
        path = self.dir / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def _local_dir(spec: str, scratch: Path) -> Path:
    """An HF directory with safetensors for any loader spec; adapters and sharded runs are exported into `scratch`."""
    from lmforge.model.export import export_model, sharded_checkpoint
    from lmforge.model.load import hf_dir, resolve

    if sharded_checkpoint(spec) is not None or resolve(spec).kind == "adapter":
        out = scratch / f"input-{len(list(scratch.iterdir()))}"
        export_model(spec, out, merge_lora=True)
        return out
    if resolve(spec).kind == "hub":
        raise MergeError(f"{spec}: merge reads local models; download it first or pass a local directory")
    return Path(hf_dir(spec))


def _check_compatible(ref: Source, other: Source) -> None:
    """Same tensor names and shapes as the reference model; the first difference is the error."""
    for name, (shape, _) in ref.header.items():
        if name not in other.header:
            raise MergeError(f"cannot merge {other.spec} with {ref.spec}: tensor {name} is missing from {other.spec} "
                             f"(different architectures)")
        if other.header[name][0] != shape:
            raise MergeError(f"cannot merge {other.spec} with {ref.spec}: tensor {name} is {other.header[name][0]} "
                             f"there and {shape} in {ref.spec} (different architectures or vocabularies)")
    extra = sorted(set(other.header) - set(ref.header))
    if extra:
        raise MergeError(f"cannot merge {other.spec} with {ref.spec}: {other.spec} has tensor {extra[0]} that "
                         f"{ref.spec} lacks (different architectures)")


def _check_vocabularies(ref: str, ref_dir: Path, other: str, other_dir: Path) -> None:
    """Equal shapes can still hide different token ids; compare the tokenizers' vocabularies when both have one."""
    from tokenizers import Tokenizer

    a, b = ref_dir / "tokenizer.json", other_dir / "tokenizer.json"
    if not (a.is_file() and b.is_file()) or filecmp.cmp(a, b, shallow=False):
        return
    va, vb = Tokenizer.from_file(str(a)).get_vocab(), Tokenizer.from_file(str(b)).get_vocab()
    if va == vb:
        return
    ia, ib = {i: t for t, i in va.items()}, {i: t for t, i in vb.items()}
    first = min(i for i in set(ia) | set(ib) if ia.get(i) != ib.get(i))
    raise MergeError(f"cannot merge {other} with {ref}: different vocabularies (token id {first} is "
                     f"{ib.get(first)!r} there and {ia.get(first)!r} in {ref}); merged embeddings would be garbled")


# ---- the merge ----------------------------------------------------------------------------------------------------

def _layer_position(name: str, n_layers: int) -> float:
    """mergekit's t: layer / (layers - 1) inside the layers (1 for a single layer), 0 for the other tensors."""
    m = LAYER.search(name)
    if m is None:
        return 0.0
    return int(m.group(1)) / (n_layers - 1) if n_layers > 1 else 1.0


def _plan_inputs(cfg: MergeConfig, spec: MethodSpec) -> tuple[list[str], list[dict | None]]:
    """The input specs in mergekit's order (the models, then the base when not among them) and their parameters."""
    specs = [m.model for m in cfg.models]
    params = [m.parameters for m in cfg.models]
    if spec.base and cfg.base_model is None:
        raise MergeError(f"base_model: {cfg.merge_method} needs a base model")
    if cfg.base_model is not None and cfg.base_model not in specs:
        specs.append(cfg.base_model)
        params.append(None)
    if len(specs) < spec.min_inputs or (spec.max_inputs is not None and len(specs) > spec.max_inputs):
        want = spec.min_inputs if spec.max_inputs == spec.min_inputs else f"at least {spec.min_inputs}"
        raise MergeError(f"models: {cfg.merge_method} takes {want} models including the base, got {len(specs)}")
    return specs, params


def merge_models(cfg: MergeConfig) -> dict:
    """Merge as `cfg` says into `cfg.out` (written to a temp sibling and renamed); returns a summary."""
    start = time.perf_counter()
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise MergeError(f"{out} exists and is not empty; pass --overwrite to replace it")
    spec = METHODS[cfg.merge_method]
    _check_parameters(cfg, spec)
    specs, params = _plan_inputs(cfg, spec)
    if cfg.tokenizer_source == "base" and cfg.base_model is None:
        raise MergeError("tokenizer_source: `base` needs a base_model")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".merge-{out.name}-", dir=out.parent) as scratch:
        inputs_dir = Path(scratch) / "inputs"
        inputs_dir.mkdir()
        dirs: dict[str, Path] = {}
        for s in specs:
            if s not in dirs:
                dirs[s] = _local_dir(s, inputs_dir)
        sources = [Source(s, dirs[s]) for s in specs]
        ref = sources[specs.index(cfg.base_model)] if cfg.base_model is not None else sources[0]
        for src in sources:
            if src is not ref:
                _check_compatible(ref, src)
                _check_vocabularies(ref.spec, ref.dir, src.spec, src.dir)
        plan = _plan_tensors(cfg, spec, specs, params, sources, ref)
        donor_spec = cfg.base_model or specs[0] if cfg.tokenizer_source in (None, "base") else cfg.tokenizer_source
        donor = dirs.get(donor_spec) or _local_dir(donor_spec, inputs_dir)
        _check_vocabularies(ref.spec, ref.dir, donor_spec, donor)
        tmp = Path(scratch) / "out"
        if cfg.random_seed is not None:
            torch.manual_seed(cfg.random_seed)
        files = write_streamed(tmp, plan, cfg.max_shard_bytes)
        dtype = plan[-1].dtype
        _write_metadata(tmp, cfg, ref, donor_spec, donor, dtype)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.rename(tmp, out)
    return {"out_dir": str(out), "method": cfg.merge_method, "models": specs, "base": cfg.base_model,
            "tensors": len(plan), "params": sum(p.numel for p in plan), "dtype": str(dtype).removeprefix("torch."),
            "files": files, "tokenizer": donor_spec, "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class Planned:
    """One output tensor: its name, shape and dtype (known from the input headers) and how to compute it."""
    name: str
    shape: list[int]
    dtype: torch.dtype
    compute: Callable[[], torch.Tensor]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _plan_tensors(cfg: MergeConfig, spec: MethodSpec, specs: list[str], params: list[dict | None],
                  sources: list[Source], ref: Source) -> list[Planned]:
    """Every output tensor, with its parameters resolved now (so a bad one fails before anything is written)."""
    n_layers = int(ref.config().get("num_hidden_layers") or 0) or \
        len({m.group(1) for n in ref.header if (m := LAYER.search(n))})
    in_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    out_dtype = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    base_i = specs.index(cfg.base_model) if spec.base else None
    others = [i for i in range(len(specs)) if i != base_i]
    plan = []
    for name, (shape, _) in ref.header.items():
        t = _layer_position(name, n_layers)
        shared = {k: _resolve(k, kind, d, [cfg.parameters], name, t, "the merge")
                  for k, (kind, d) in spec.shared.items()}
        per_model = [{k: _resolve(k, kind, d, [params[i], cfg.parameters], name, t, specs[i])
                      for k, (kind, d) in spec.per_model.items()} for i in others]
        dtypes = [DTYPES.get(_torch_name(s.header[name][1])) for s in sources]
        work = in_dtype or _promoted(dtypes, name)

        def compute(name=name, shared=shared, per_model=per_model, work=work) -> torch.Tensor:
            tensors = [sources[i].read(name).to(work) for i in range(len(sources))]
            base = tensors[base_i] if base_i is not None else None
            merged = spec.fn([tensors[i] for i in others], base, shared, per_model)
            return merged.to(out_dtype) if out_dtype is not None else merged

        plan.append(Planned(name, shape, out_dtype or work, compute))
    return plan


def write_streamed(directory: Path, plan: list[Planned], max_shard_bytes: int) -> list[str]:
    """Write the planned tensors as model.safetensors, or HF's numbered shards plus their index, each tensor
    computed and written straight to disk before the next is computed.

    sharded.write_safetensors learns sizes as tensors arrive, so it holds a whole shard (5 GB by default) in
    memory; here every shape and dtype is known from the input headers before any tensor is computed, so each
    file's header (with every offset) is written first and peak memory stays at the tensors of one merge step.
    """
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    directory.mkdir(parents=True, exist_ok=True)
    for name, shard in zip(names, shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for p in shard:
            header[p.name] = {"dtype": SAFE_DTYPES[p.dtype], "shape": p.shape,
                              "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(directory / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for p in shard:
                t = p.compute()
                if list(t.shape) != p.shape or t.dtype != p.dtype:
                    raise RuntimeError(f"{p.name}: merged to {list(t.shape)} {t.dtype}, planned {p.shape} {p.dtype}")
                f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
                del t
    if len(names) == 1:
        return names
    weight_map = {p.name: name for name, shard in zip(names, shards) for p in shard}
    index = {"metadata": {"total_size": sum(p.nbytes for p in plan)}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_INDEX]


def _torch_name(safetensors_dtype: str) -> str:
    return {v: str(k).removeprefix("torch.") for k, v in SAFE_DTYPES.items()}.get(safetensors_dtype, safetensors_dtype)


def _promoted(dtypes: list[torch.dtype | None], name: str) -> torch.dtype:
    if any(d is None for d in dtypes):
        raise MergeError(f"tensor {name} is not floating point (float32, bfloat16, float16) in every model")
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _write_metadata(out: Path, cfg: MergeConfig, ref: Source, donor_spec: str, donor: Path, dtype) -> None:
    """config.json (the base's, or the first model's, with the output dtype), the donor's tokenizer files, and
    the merge YAML as mergekit writes it (mergekit_config.yml), so the merge can be rerun with either tool."""
    config = ref.config()
    key = "torch_dtype" if "torch_dtype" in config else "dtype"
    if cfg.out_dtype or cfg.dtype:
        config[key] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if (donor / "tokenizer_config.json").is_file() and any((donor / f).is_file()
                                                           for f in ("tokenizer.json", "tokenizer.model")):
        for f in TOKENIZER_FILES:
            if (donor / f).is_file():
                shutil.copy2(donor / f, out / f)
    else:
        from lmforge.model.load import load_tokenizer

        load_tokenizer(donor_spec).save_pretrained(out)
    mergekit = cfg.model_dump(mode="json", include=set(MERGEKIT_KEYS), exclude_none=True)
    (out / "mergekit_config.yml").write_text(yaml.safe_dump(mergekit, sort_keys=False))
