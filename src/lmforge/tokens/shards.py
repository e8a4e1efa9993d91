"""Token shards: documents encoded into flat `train.bin` / `val.bin` arrays plus `meta.json`.

Format (DESIGN.md): little-endian uint16 (vocab_size <= 65535) or uint32 token ids, each document
followed by EOS. A nanoGPT `train.bin` / `val.bin` without meta.json is valid input given a vocab size.
A sharded corpus (`write_sharded`, `tokenize --workers N`) holds one shards/NNNNN.{train,val}.bin pair
per input file and lists them, in input order, under "shards" in meta.json (the index); `load_shard`
reads either layout as one memory-mapped token sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from itertools import chain
from pathlib import Path

import numpy as np

from lmforge.data.readers import ReadReport, iter_texts, list_inputs
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
                           files: dict, progress=None) -> tuple[dict, dict]:
    """One document cut by tokens: the first int(n * (1 - val_fraction)) to train, the rest to val, no EOS.

    Returns (n_tokens, n_docs) per split.
    """
    n_tokens, n_docs = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0)
    ids = encode_batch(tok, [text])[0]
    n_train = int(len(ids) * (1 - val_fraction))
    for split, part in zip(SPLITS, (ids[:n_train], ids[n_train:])):
        np.array(part, dtype=dtype).tofile(files[split])
        n_tokens[split], n_docs[split] = len(part), int(len(part) > 0)
    if progress is not None:
        progress(1, len(ids))
    return n_tokens, n_docs


def _write_split_by_documents(tok, docs: Iterator[tuple[str, bool]], val_fraction: float, eos: int,
                              dtype: np.dtype, files: dict, progress=None) -> tuple[dict, dict]:
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
        if progress is not None:
            progress(len(batch), sum(len(ids) + 1 for ids in by_split["train"] + by_split["val"]))
    return n_tokens, n_docs


SHARDS_DIR = "shards"


def _fingerprint(tokenizer_dir: str | Path, val_fraction: float, text_field: str) -> str:
    """A hash of what a shard's tokens depend on besides its input: tokenizer files, split and text field.

    A done marker with another fingerprint is stale, so changing any of them re-tokenizes every file.
    """
    h = hashlib.sha256(json.dumps([val_fraction, text_field]).encode())
    for f in sorted(Path(tokenizer_dir).glob("*.json")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _source_id(item: Path | str) -> dict:
    """The input as a marker records it: path with size and mtime (a changed file is redone), or an hf: spec."""
    if isinstance(item, str):
        return {"source": item}
    st = Path(item).stat()
    return {"source": str(Path(item).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


_TOKENIZERS: dict = {}
_PROGRESS = None


def _init_worker(queue) -> None:
    """Pool initializer: progress of each batch goes to the parent through `queue`."""
    global _PROGRESS
    _PROGRESS = queue.put


def _tokenize_file(job: tuple) -> dict:
    """Tokenize one input into shards/NNNNN.{train,val}.bin split as `write_shards` splits it alone.

    Why: a file is the unit of work and of resume; its done marker (NNNNN.json) is written last,
    atomically, so a killed run leaves either a complete marked shard pair or nothing that counts.
    """
    i, item, tok_dir, out_dir, val_fraction, text_field, marker_base = job
    if tok_dir not in _TOKENIZERS:
        _TOKENIZERS[tok_dir] = load_tokenizer(tok_dir)
    tok = _TOKENIZERS[tok_dir]
    eos, dtype = eos_id(tok), token_dtype(len(tok))
    stem = Path(out_dir) / SHARDS_DIR / f"{i:05d}"
    progress = (lambda d, t: _PROGRESS((d, t))) if _PROGRESS is not None else None
    report = ReadReport()
    docs = _with_last(iter_texts([item], text_field, report))
    files = {split: open(f"{stem}.{split}.bin.tmp", "wb") for split in SPLITS}
    try:
        first = next(docs, None)
        if first is None:
            n_tokens, n_docs, split_by = dict.fromkeys(SPLITS, 0), dict.fromkeys(SPLITS, 0), "empty"
        elif first[1]:
            split_by = "tokens"
            n_tokens, n_docs = _write_split_by_tokens(tok, first[0], val_fraction, dtype, files, progress)
        else:
            split_by = "documents"
            n_tokens, n_docs = _write_split_by_documents(tok, chain([first], docs), val_fraction, eos, dtype,
                                                         files, progress)
    finally:
        for f in files.values():
            f.close()
    for split in SPLITS:
        Path(f"{stem}.{split}.bin.tmp").replace(f"{stem}.{split}.bin")
    marker = {**marker_base, "index": i, **_source_id(item), "n_tokens": n_tokens, "n_docs": n_docs,
              "split_by": split_by, "skipped": dict(report.skipped), "skipped_examples": report.examples,
              SPLITS[0]: f"{SHARDS_DIR}/{i:05d}.train.bin", SPLITS[1]: f"{SHARDS_DIR}/{i:05d}.val.bin"}
    Path(f"{stem}.json.tmp").write_text(json.dumps(marker, indent=2) + "\n")
    Path(f"{stem}.json.tmp").replace(f"{stem}.json")
    return marker


def _done_marker(stem: Path, item: Path | str, marker_base: dict) -> dict | None:
    """The marker of a finished shard for this input and tokenizer, or None when it must be (re)done."""
    try:
        marker = json.loads(stem.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    expected = {**marker_base, **_source_id(item)}
    if any(marker.get(k) != v for k, v in expected.items()):
        return None
    if isinstance(item, str) or not all(Path(stem.parent.parent, marker[s]).is_file() for s in SPLITS):
        return None  # an hf: dataset can change under the same name, so it is always redone
    return marker


def write_sharded(
    paths: str | Path | Iterable[str | Path],
    tokenizer_spec: str | Path,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    text_field: str = "text",
    workers: int = 1,
) -> dict:
    """Tokenize each input file into its own shard pair with `workers` processes; write the index; return it.

    Why: corpora of many files tokenize in parallel, resume per file after a kill (finished files,
    marked done for the same input, tokenizer and split, are not redone), and give byte-equal output
    for any worker count: each file's split depends on that file alone and the index keeps input order.
    The index is out_dir/meta.json (the usual keys plus "shards"), written last and atomically.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    out_dir = Path(out_dir)
    (out_dir / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
    report = ReadReport()
    inputs = list_inputs(paths, report)
    if not inputs:
        raise UserError(f"no input files in {paths} (skipped: {dict(report.skipped)})")
    if str(tokenizer_spec) == "char":
        chars = set()
        for text in iter_texts(inputs, text_field):
            chars.update(text)
        tokenizer_spec = build_char_tokenizer("".join(chars), out_dir / "tokenizer")
    tok_dir = str(Path(tokenizer_spec).resolve())
    tok = load_tokenizer(tok_dir)
    eos, vocab_size = eos_id(tok), len(tok)
    dtype = token_dtype(vocab_size)
    marker_base = {"fingerprint": _fingerprint(tok_dir, val_fraction, text_field), "dtype": dtype.name}

    markers: dict[int, dict] = {}
    todo = []
    for i, item in enumerate(inputs):
        done = _done_marker(out_dir / SHARDS_DIR / f"{i:05d}", item, marker_base)
        if done is not None:
            markers[i] = done
        else:
            todo.append((i, item, tok_dir, str(out_dir), val_fraction, text_field, marker_base))
    print(f"tokenize: {len(inputs)} input files, {len(markers)} already done, {len(todo)} to do, "
          f"{min(workers, max(len(todo), 1))} worker(s)", file=sys.stderr, flush=True)
    for marker in _run_jobs(todo, workers):
        markers[marker["index"]] = marker

    shards = [markers[i] for i in range(len(inputs))]
    totals = {key: {s: sum(m[key][s] for m in shards) for s in SPLITS} for key in ("n_tokens", "n_docs")}
    skipped: dict = dict(report.skipped)
    for m in shards:
        for reason, n in m["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    # The tokenizer inside out_dir (char) is recorded relative to it: the corpus directory moves as a whole.
    tok_rel = Path(os.path.relpath(tok_dir, out_dir.resolve())) if Path(tok_dir).is_relative_to(out_dir.resolve()) else None
    meta = {
        "dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos, "tokenizer": str(tok_rel or tok_dir),
        **totals, "split_by": "file", "val_fraction": val_fraction, "skipped": skipped,
        "skipped_examples": [e for m in shards for e in m["skipped_examples"]][:20],
        "shards": [{"source": m["source"], **{s: m[s] for s in SPLITS}, "n_tokens": m["n_tokens"],
                    "n_docs": m["n_docs"], "split_by": m["split_by"]} for m in shards],
    }
    (out_dir / "meta.json.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    (out_dir / "meta.json.tmp").replace(out_dir / "meta.json")
    return meta


class _Progress:
    """Documents/s and tokens/s of a tokenize run on stderr: a tqdm bar on a terminal, else a line every few seconds.

    Why: a long run must show it is moving, also when its stderr goes to a log file.
    """

    def __init__(self, n_files: int, every_s: float = 3.0):
        from tqdm import tqdm

        self.t0 = self.t_line = time.perf_counter()
        self.every_s, self.docs, self.tokens, self.files, self.n_files = every_s, 0, 0, 0, n_files
        self.bar = tqdm(total=n_files, unit="file", file=sys.stderr, mininterval=every_s, desc="tokenize",
                        dynamic_ncols=True) if sys.stderr.isatty() else None

    def rates(self) -> str:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return f"{self.docs / dt:,.0f} docs/s, {self.tokens / dt:,.0f} tokens/s"

    def add(self, docs: int, tokens: int, files: int = 0) -> None:
        self.docs, self.tokens, self.files = self.docs + docs, self.tokens + tokens, self.files + files
        if self.bar is not None:
            self.bar.set_postfix_str(self.rates(), refresh=False)
            self.bar.update(files)
        elif time.perf_counter() - self.t_line >= self.every_s:
            self.t_line = time.perf_counter()
            print(f"tokenize: {self.files}/{self.n_files} files, {self.docs:,} docs, {self.tokens:,} tokens "
                  f"({self.rates()})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        print(f"tokenize: {self.files}/{self.n_files} files, {self.docs:,} docs, {self.tokens:,} tokens in "
              f"{time.perf_counter() - self.t0:.1f} s ({self.rates()})", file=sys.stderr, flush=True)


def _run_jobs(todo: list[tuple], workers: int) -> Iterator[dict]:
    """Run the file jobs in this process (1 worker) or a spawn pool of `workers`, yielding each marker.

    Why: files are independent units, so a pool tokenizes them in parallel; markers come back in any
    order and the caller places them by index.
    """
    global _PROGRESS
    if not todo:
        return
    progress = _Progress(len(todo))
    try:
        if workers == 1 or len(todo) == 1:
            _PROGRESS = lambda item: progress.add(*item)  # noqa: E731
            try:
                for job in todo:
                    marker = _tokenize_file(job)
                    progress.add(0, 0, 1)
                    yield marker
            finally:
                _PROGRESS = None
            return
        import multiprocessing as mp
        import queue as queue_mod

        ctx = mp.get_context("spawn")  # the Rust tokenizer's threads do not survive fork
        q = ctx.Queue()

        def drain(timeout: float = 0.0) -> None:
            while True:
                try:
                    progress.add(*(q.get(timeout=timeout) if timeout else q.get_nowait()))
                except queue_mod.Empty:
                    return

        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(q,)) as pool:
            pending = pool.imap_unordered(_tokenize_file, todo)
            for _ in range(len(todo)):
                while True:
                    drain()
                    try:
                        marker = pending.next(timeout=0.5)
                        break
                    except mp.TimeoutError:
                        continue
                progress.add(0, 0, 1)
                yield marker
            drain(timeout=0.1)  # the last batches' progress, sent before their files finished
    finally:
        progress.close()


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
        if "shards" in meta:
            _check_index(data_dir, meta)
            if meta["tokenizer"] and not Path(meta["tokenizer"]).is_absolute():
                meta["tokenizer"] = str((data_dir / meta["tokenizer"]).resolve())
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


def _check_index(data_dir: Path, meta: dict) -> None:
    """Every shard the index lists exists with the size its token count implies; else a one-line UserError.

    Why: a shard rewritten, truncated or deleted after indexing would otherwise train on wrong tokens.
    """
    itemsize = np.dtype(meta["dtype"]).itemsize
    for k, shard in enumerate(meta["shards"]):
        for split in SPLITS:
            path = data_dir / shard[split]
            if not path.is_file():
                raise UserError(f"{data_dir}/meta.json: shard {k} ({shard.get('source')}): {path} is missing; "
                                "rerun `lmforge tokenize`")
            want = shard["n_tokens"][split] * itemsize
            if path.stat().st_size != want:
                raise UserError(f"{data_dir}/meta.json does not match its shards: {path} has "
                                f"{path.stat().st_size} bytes, the index says {want}; rerun `lmforge tokenize`")
    for split in SPLITS:
        if sum(s["n_tokens"][split] for s in meta["shards"]) != meta["n_tokens"][split]:
            raise UserError(f"{data_dir}/meta.json: n_tokens[{split!r}] is not the sum over its shards")


class ShardedTokens:
    """Several memory-mapped shards read as one token sequence, in index order.

    Why: samplers index windows by a global offset; a window may cross a shard boundary, and no
    shard is ever loaded whole, so memory stays flat as the corpus grows.
    """

    def __init__(self, parts: list[np.ndarray]):
        self.parts = [p for p in parts if len(p)]
        self.ends = np.cumsum([len(p) for p in self.parts], dtype=np.int64)
        self.dtype = self.parts[0].dtype if self.parts else np.dtype("<u2")

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, idx) -> np.ndarray:
        """Tokens at integer offsets `idx` (any shape; an int or a slice is also accepted)."""
        if isinstance(idx, slice):
            idx = np.arange(*idx.indices(len(self)))
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token offset out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.ends, idx, side="right")
        out = np.empty(idx.shape, dtype=self.dtype)
        starts = self.ends - [len(p) for p in self.parts]
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k][idx[sel] - starts[k]]
        return out


def load_shard(data_dir: str | Path, split: str, vocab_size: int | None = None,
               dtype: str = "uint16") -> np.ndarray | ShardedTokens:
    """Memory-map data_dir's {split} tokens as a read-only 1-D sequence (dtype from meta.json).

    Why: one call for both layouts: train.bin / val.bin, or the shards a meta.json index lists.
    """
    meta = read_meta(data_dir, vocab_size, dtype)
    if "shards" in meta:
        return ShardedTokens([_memmap(Path(data_dir) / s[split], meta) for s in meta["shards"]])
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise FileNotFoundError(f"token shard not found: {path}")
    return _memmap(path, meta)


def has_split(data_dir: str | Path, split: str) -> bool:
    """Whether data_dir (either layout) has a `split` file to read, before anything is opened."""
    meta_path = Path(data_dir) / "meta.json"
    if meta_path.is_file():
        try:
            if "shards" in json.loads(meta_path.read_text()):
                return True
        except ValueError:
            pass
    return (Path(data_dir) / f"{split}.bin").is_file()


def _memmap(path: Path, meta: dict) -> np.ndarray:
    """Memory-map one shard file read-only (an empty file as an empty array: np.memmap cannot map it)."""
    dt = np.dtype(meta["dtype"]).newbyteorder("<")
    size = path.stat().st_size
    if size % dt.itemsize:
        raise UserError(f"{path}: size {size} is not a multiple of {dt.itemsize} bytes ({meta['dtype']})")
    if size == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dt)
    return np.memmap(path, dtype=dt, mode="r")
