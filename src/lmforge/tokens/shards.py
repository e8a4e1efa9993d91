"""Token shards: documents encoded into flat `train.bin` / `val.bin` arrays plus `meta.json`.

Format (DESIGN.md): little-endian uint16 (vocab_size <= 65535) or uint32 token ids, each document
followed by EOS. A nanoGPT `train.bin` / `val.bin` without meta.json is valid input given a vocab size.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.data.readers import ReadReport, iter_texts
from lmforge.errors import UserError
from lmforge.tokens.tokenizer import build_char_tokenizer, encode_batch, eos_id, load_tokenizer

SPLITS = ("train", "val")
META_KEYS = ("dtype", "vocab_size", "eos_id", "tokenizer", "n_tokens", "n_docs")
BATCH_DOCS = 1000
BATCH_CHARS = 8_000_000


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest little-endian unsigned dtype that holds every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def _is_val(i: int, val_fraction: float) -> bool:
    """Whether document i goes to val: every (1/val_fraction)-th document, spread evenly over the input."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def _with_last(items: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    it = iter(items)
    prev = next(it, None)
    for item in it:
        yield prev, False
        prev = item
    if prev is not None:
        yield prev, True


def _batches(docs: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """Group documents into batches of at most BATCH_DOCS documents or about BATCH_CHARS characters."""
    batch, n_chars = [], 0
    for doc in docs:
        batch.append(doc)
        n_chars += len(doc[0])
        if len(batch) >= BATCH_DOCS or n_chars >= BATCH_CHARS:
            yield batch
            batch, n_chars = [], 0
    if batch:
        yield batch


def write_shards(
    paths: str | Path | Iterable[str | Path],
    tokenizer_spec: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
) -> dict:
    """Encode the documents in `paths` into out_dir/train.bin, val.bin and meta.json; return the meta.

    `tokenizer_spec` is an HF tokenizer directory, or "char" to build a character tokenizer from the
    inputs into out_dir/tokenizer/.
    Split: one document (e.g. a single .txt) is cut by tokens, the first int(n * (1 - val_fraction))
    to train and the rest to val, with no EOS: for "char" on a .txt this is byte-for-byte nanoGPT's
    shakespeare_char prepare.py. Several documents are split whole: document i goes to val when
    int((i+1) * val_fraction) > int(i * val_fraction) (every 10th for 0.1, deterministic and spread
    over the corpus), and the last document goes to val if val would otherwise be empty; each
    document is followed by EOS. Files are written as .tmp and renamed at the end, so a failed run
    leaves earlier shards in out_dir intact.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if str(tokenizer_spec) == "char":
        chars = set()
        for text in iter_texts(paths, text_field):
            chars.update(text)
        tokenizer_spec = build_char_tokenizer("".join(chars), out_dir / "tokenizer")
    tok = load_tokenizer(tokenizer_spec)
    eos, vocab_size = eos_id(tok), len(tok)
    dtype = token_dtype(vocab_size)

    report = ReadReport()
    docs = _with_last(iter_texts(paths, text_field, report))
    files = {split: open(out_dir / f"{split}.bin.tmp", "wb") for split in SPLITS}
    try:
        first = next(docs, None)
        if first is None:
            raise UserError(f"no documents in {paths} (skipped: {dict(report.skipped)})")
        text, is_last = first
        if is_last:
            split_by = "tokens"
            n_tokens, n_docs = _write_split_by_tokens(tok, text, val_fraction, dtype, files)
        else:
            split_by = "documents"
            n_tokens, n_docs = _write_split_by_documents(tok, chain([first], docs), val_fraction, eos, dtype, files)
    finally:
        for f in files.values():
            f.close()

    meta = {
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos,
        "tokenizer": str(Path(tokenizer_spec).resolve()),
        "n_tokens": n_tokens,
        "n_docs": n_docs,
        "split_by": split_by,
        "val_fraction": val_fraction,
        "skipped": dict(report.skipped),
        "skipped_examples": report.examples,
    }
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    for name in [f"{split}.bin" for split in SPLITS] + ["meta.json"]:
        (out_dir / f"{name}.tmp").replace(out_dir / name)
    return meta


def _write_split_by_tokens(tok, text: str, val_fraction: float, dtype: np.dtype,
                           files: dict) -> tuple[dict, dict]:
    """One document cut by tokens: the first int(n * (1 - val_fraction)) to train, the rest to val, no EOS.

    Returns (n_tokens, n_docs) per split.
    """
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    ids = encode_batch(tok, [text])[0]
    n_train = int(len(ids) * (1 - val_fraction))
    for split, part in zip(SPLITS, (ids[:n_train], ids[n_train:])):
        np.array(part, dtype=dtype).tofile(files[split])
        n_tokens[split], n_docs[split] = len(part), int(len(part) > 0)
    return n_tokens, n_docs


def _write_split_by_documents(tok, docs: Iterator[tuple[str, bool]], val_fraction: float, eos: int,
                              dtype: np.dtype, files: dict) -> tuple[dict, dict]:
    """Whole documents, each followed by EOS, every (1/val_fraction)-th to val (the last too if val is empty).

    Returns (n_tokens, n_docs) per split.
    """
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    for batch in _batches(docs):
        by_split = {split: [] for split in SPLITS}
        for ids, (_, last) in zip(encode_batch(tok, [text for text, _ in batch]), batch):
            i = n_docs["train"] + n_docs["val"]
            val = val_fraction > 0 and (_is_val(i, val_fraction) or (last and n_docs["val"] == 0))
            split = "val" if val else "train"
            by_split[split].append(ids)
            n_docs[split] += 1
        for split, seqs in by_split.items():
            count = sum(map(len, seqs)) + len(seqs)
            flat = chain.from_iterable(chain(ids, (eos,)) for ids in seqs)
            np.fromiter(flat, dtype=dtype, count=count).tofile(files[split])
            n_tokens[split] += count
    return n_tokens, n_docs


def read_meta(data_dir: str | Path, vocab_size: int | None = None, dtype: str = "uint16") -> dict:
    """Read and check data_dir/meta.json; for nanoGPT shards without one, describe them from the arguments.

    A nanoGPT meta.pkl is never unpickled (a pickle can run code), so its vocab size must be given.
    """
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise UserError(f"{meta_path}: not valid JSON ({e})") from None
        for key in META_KEYS:
            if key not in meta:
                raise UserError(f"{meta_path}: missing key {key!r} (needs {', '.join(META_KEYS)})")
        if meta["dtype"] not in ("uint16", "uint32"):
            raise UserError(f"{meta_path}: dtype {meta['dtype']!r} is not 'uint16' or 'uint32'")
        return meta
    bins = [split for split in SPLITS if (data_dir / f"{split}.bin").exists()]
    if not bins:
        raise FileNotFoundError(f"{data_dir}: no meta.json and no train.bin / val.bin")
    if vocab_size is None:
        pkl = " (its meta.pkl is not read: pickles are never loaded)" if (data_dir / "meta.pkl").exists() else ""
        raise UserError(f"{data_dir}: token shards without meta.json{pkl}; give model.vocab_size=N")
    if dtype not in ("uint16", "uint32"):
        raise UserError(f"dtype {dtype!r} is not 'uint16' or 'uint32'")
    itemsize = np.dtype(dtype).itemsize
    return {
        "dtype": dtype,
        "vocab_size": vocab_size,
        "eos_id": None,
        "tokenizer": None,
        "n_tokens": {split: (data_dir / f"{split}.bin").stat().st_size // itemsize for split in bins},
        "n_docs": None,
    }


def load_shard(data_dir: str | Path, split: str, vocab_size: int | None = None, dtype: str = "uint16") -> np.ndarray:
    """Memory-map data_dir/{split}.bin as a read-only 1-D array of token ids (dtype from meta.json)."""
    meta = read_meta(data_dir, vocab_size, dtype)
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"token shard not found: {path}")
    dt = np.dtype(meta["dtype"]).newbyteorder("<")
    size = path.stat().st_size
    if size % dt.itemsize:
        raise UserError(f"{path}: size {size} is not a multiple of {dt.itemsize} bytes ({meta['dtype']})")
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dt)
    return np.memmap(path, dtype=dt, mode="r")
