"""Sharded checkpoints on disk: reading torch.distributed.checkpoint (DCP) directories safely, tensor by tensor,
and writing HF safetensors in bounded pieces.

DCP stores its index (`.metadata`) as a pickle and non-tensor values as pickles loaded with
`weights_only=False`. We read the index with an unpickler that admits only DCP's own metadata classes and
refuse non-tensor items outright, so a checkpoint from elsewhere cannot run code. The training engine
(train/checkpoint.py) writes these directories; `lmforge export` reads them through the same functions.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is made: model.load imports this module on the CLI's path
    import torch

DCP_DIR = "dcp"  # a checkpoint's sharded state, beside its trainer_state.pt
MAX_SHARD_BYTES = 5 * 1024 ** 3  # one safetensors file; HF's default shard size
SAFE_INDEX = "model.safetensors.index.json"


class ShardedCheckpointError(UserError):
    """A sharded checkpoint is unreadable, or holds something other than tensors."""


def _allowed(module: str, name: str):
    """The classes and functions DCP's metadata pickle may name (anything else is refused)."""
    import pathlib

    import torch

    if module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem") \
            and (name[0].isupper() or name in ("_StorageInfo", "_MEM_FORMAT_ENCODING")):
        import importlib
        return getattr(importlib.import_module(module), name)
    if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if (module, name) == ("torch.serialization", "_get_layout"):
        return torch.serialization._get_layout
    if module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"):
        return getattr(pathlib, name)
    if (module, name) == ("collections", "OrderedDict"):
        import collections
        return collections.OrderedDict
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        found = _allowed(module, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")
        return found


def _reader(path: Path):
    """A DCP FileSystemReader whose index is unpickled with the allowlist above."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            index = Path(self.path) / ".metadata"
            try:
                with open(index, "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
            except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as e:
                raise ShardedCheckpointError(f"{index}: unreadable checkpoint index ({e})") from e
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner():
    """DCP's load planner, minus its one pickle path: a checkpoint value that is not a tensor is refused."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class TensorsOnly(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            raise ShardedCheckpointError(f"checkpoint value {read_item.dest_index.fqn!r} is not a tensor; "
                                         "lmforge checkpoints hold tensors only")

    return TensorsOnly()


def is_sharded(checkpoint: Path) -> bool:
    """Whether a checkpoint directory holds DCP shards."""
    return (Path(checkpoint) / DCP_DIR / ".metadata").is_file()


def load_sharded(state: dict, checkpoint: Path, distributed: bool) -> None:
    """Fill `state` (nested dicts of tensors or DTensors) in place from `checkpoint`'s shards, resharding as needed.

    Collective when `distributed`: every rank calls it with its own (possibly sharded) tensors.
    """
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # DCP warns on every one-process load that it "assumes" the intent we stated
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=_reader(Path(checkpoint) / DCP_DIR), planner=_planner(),
                 no_dist=not distributed)


def tensor_index(checkpoint: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Every tensor a sharded checkpoint holds, by its flattened name ("model.blocks.0.o.weight"), with shape and dtype."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _reader(Path(checkpoint) / DCP_DIR).read_metadata()
    return {k: (v.size, v.properties.dtype) for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


class ShardedWeights(Mapping):
    """One section (e.g. "model") of a sharded checkpoint as a read-only mapping that loads a tensor when asked.

    Whole, unsharded tensors come back on the CPU, one at a time: a consumer that writes each out before asking
    for the next holds one tensor, not the model.
    """

    def __init__(self, checkpoint: Path, section: str):
        self.checkpoint, self.section = Path(checkpoint), section
        prefix = section + "."
        self.index = {k[len(prefix):]: v for k, v in tensor_index(checkpoint).items() if k.startswith(prefix)}

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        shape, dtype = self.index[name]
        t = torch.empty(shape, dtype=dtype)
        load_sharded({self.section: {name: t}}, self.checkpoint, distributed=False)
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


class LazyWeights(Mapping):
    """Named tensors computed on access (a renaming or a split of another mapping), for streaming conversions."""

    def __init__(self, thunks: dict[str, Callable[[], torch.Tensor]]):
        self.thunks = thunks

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.thunks[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self.thunks)

    def __len__(self) -> int:
        return len(self.thunks)


def write_safetensors(directory: Path, weights: Mapping[str, torch.Tensor], max_shard_bytes: int = MAX_SHARD_BYTES
                      ) -> list[str]:
    """Write `weights` as model.safetensors, or as HF's numbered shards plus model.safetensors.index.json when
    they exceed `max_shard_bytes`; returns the file names. Tensors are read from `weights` one at a time and a
    shard is written as soon as it is full, so a lazy mapping is never held whole."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    pieces: list[tuple[str, list[str]]] = []
    batch: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal batch, size
        name = f".part-{len(pieces):05d}.safetensors"
        save_file(batch, str(directory / name), metadata={"format": "pt"})
        pieces.append((name, list(batch)))
        batch, size = {}, 0

    for name in weights:
        t = weights[name].detach().to("cpu").contiguous()
        if batch and size + t.numel() * t.element_size() > max_shard_bytes:
            flush()
        batch[name] = t
        size += t.numel() * t.element_size()
    if batch or not pieces:
        flush()
    if len(pieces) == 1:
        os.replace(directory / pieces[0][0], directory / "model.safetensors")
        return ["model.safetensors"]
    names, weight_map = [], {}
    total = sum((directory / p).stat().st_size for p, _ in pieces)
    for i, (part, keys) in enumerate(pieces, 1):
        final = f"model-{i:05d}-of-{len(pieces):05d}.safetensors"
        os.replace(directory / part, directory / final)
        names.append(final)
        weight_map.update({k: final for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names + [SAFE_INDEX]


def write_model_dir(path: Path, hf_state: Mapping[str, torch.Tensor], hf_config: dict, tokenizer_dir: Path | None,
                    eos_id: int | None) -> None:
    """An HF model directory: config.json, model.safetensors (or HF's shards), generation_config.json, tokenizer.

    The weights are streamed from `hf_state`, which may be lazy (see `write_safetensors`).
    """
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    write_safetensors(path, hf_state)
    generation = {"eos_token_id": eos_id, "pad_token_id": eos_id, "do_sample": True, "temperature": 0.8, "top_k": 200}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"):
                shutil.copy2(f, path / f.name)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of an HF directory written by `write_safetensors`: one file or the shards its index names."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / SAFE_INDEX
    if not index.is_file():
        return load_file(str(directory / "model.safetensors"))
    files: Iterable[str] = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(directory / f)))
    return out

