"""Exact, URL and MinHash-LSH near-duplicate removal: global across shards, in three phases on disk.

The phases talk through files, so each shard's phase 1 and 3 can run in its own process and the
corpus can be larger than memory (phase 2 reads one band at a time; dedup_lsh.py); on disk phase 1
writes about 4 * sketch_size + 8 * bands + 33 bytes per document (2.2 KiB with the defaults).

1. `write_signatures(docs, out_dir, shard_index, cfg)`: one pass over a shard. Per document (its
   global key is `(shard_index, position)`): an exact-text hash, a URL hash, an id hash, `bands`
   band hashes (each band's `rows` MinHash values hashed together) and a bottom-k sketch.
2. `dedup_lsh.find_duplicates(sig_dirs, work_dir, cfg)`: clusters the duplicates of all shards
   and writes `removed-NNNNN.npy` per shard and `duplicates.json` (counts, cluster examples).
3. `dedup_filter(manifest, shard_index)`: a pipeline step (`base.Step`) that drops the shard's
   removed documents with the reason `exact_duplicate`, `near_duplicate` or `url_duplicate`.

`dedup_documents(docs, cfg)` runs the three phases on a list, in memory and a temp directory.
What is hashed and how: dedup_text.py (normalised words and URLs) and dedup_lsh.py (the rest).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import xxhash

from lmforge.data.base import MAX_EXAMPLES, Document, StepStats, counted
from lmforge.data.dedup_lsh import (MANIFEST_FORMAT, META_DTYPE, REASONS, SIG_FORMAT, DedupConfig, band_hashes,
                                    bottom_k_sketches, find_duplicates, minhash_signatures, shingle_hashes)
from lmforge.data.dedup_text import normalize_url, normalized_words
from lmforge.errors import UserError

# ---------------------------------------------------------------- phase 1: signatures per shard

def _batches(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def write_signatures(docs: Iterable[Document], out_dir: Path, shard_index: int,
                     cfg: DedupConfig | None = None, batch_size: int = 1024) -> int:
    """Phase 1: write one shard's signatures to the directory `out_dir`; returns the number of docs.

    Files (row i = the shard's i-th document): `meta.bin` (META_DTYPE records: exact hash, URL
    hash, id hash), `bands.bin` (uint64, n x bands), `sketch.bin` (uint32, n x sketch_size),
    `ids.jsonl` (document ids, for cluster examples) and, written last, `header.json`.
    """
    cfg = cfg or DedupConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "header.json").unlink(missing_ok=True)      # absent header = incomplete shard
    n = 0
    with open(out_dir / "meta.bin", "wb") as fm, open(out_dir / "bands.bin", "wb") as fb, \
            open(out_dir / "sketch.bin", "wb") as fs, open(out_dir / "ids.jsonl", "w", encoding="utf-8") as fi:
        for batch in _batches(docs, batch_size):
            words = [normalized_words(d.text) for d in batch]
            meta = np.zeros(len(batch), META_DTYPE)
            exact = b"".join(xxhash.xxh3_128_digest(b" ".join(w)) for w in words)
            meta["exact"] = np.frombuffer(exact, ">u8").reshape(-1, 2)
            meta["id"] = np.fromiter((xxhash.xxh3_64_intdigest(d.id.encode("utf-8")) for d in batch),
                                     np.uint64, len(batch))
            if cfg.url:
                for i, d in enumerate(batch):
                    if d.url:
                        meta["url"][i] = xxhash.xxh3_64_intdigest(normalize_url(d.url).encode("utf-8"))
                        meta["has_url"][i] = 1
            if cfg.near:
                hashes, starts = shingle_hashes(words, cfg.ngram)
                sigs = minhash_signatures(hashes, starts, cfg.bands * cfg.rows, cfg.seed)
                band_hashes(sigs, cfg.bands, cfg.rows).astype("<u8").tofile(fb)
                bottom_k_sketches(hashes, starts, cfg.sketch_size).astype("<u4").tofile(fs)
            meta.tofile(fm)
            fi.write("".join(json.dumps(d.id, ensure_ascii=False) + "\n" for d in batch))
            n += len(batch)
    header = {"format": SIG_FORMAT, "shard_index": int(shard_index), "n_docs": n, "near": cfg.near,
              "url": cfg.url, **cfg.signature_keys()}
    tmp = out_dir / "header.json.tmp"
    tmp.write_text(json.dumps(header, indent=1))
    os.replace(tmp, out_dir / "header.json")
    return n


# ---------------------------------------------------------------- phase 3: the pipeline step

@dataclass
class DedupFilter:
    """A pipeline step (base.Step) dropping the documents `find_duplicates` removed from one shard.

    It must see the shard's documents in the order `write_signatures` saw them; a different id at
    a removed position or a different count is an error, never a silent wrong drop.
    """

    manifest: Path
    shard_index: int
    n_docs: int
    removed: np.ndarray
    cluster_examples: list = field(default_factory=list)
    name: str = "dedup"

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        pos_, reason_, id_ = (self.removed[k].tolist() for k in ("pos", "reason", "id"))
        j, n = 0, 0
        for n, doc in enumerate(docs, 1):
            p = n - 1
            if p >= self.n_docs:
                raise UserError(f"shard {self.shard_index}: more than the {self.n_docs} documents "
                                 f"{self.manifest} was computed from (document {doc.id!r})")
            if j < len(pos_) and pos_[j] == p:
                if xxhash.xxh3_64_intdigest(doc.id.encode("utf-8")) != id_[j]:
                    raise UserError(f"shard {self.shard_index} position {p}: document {doc.id!r} is not the "
                                     f"one write_signatures saw there; feed the shard in the same order")
                stats.drop(REASONS[reason_[j]], doc.id)
                j += 1
            else:
                yield doc
        if n != self.n_docs:
            raise UserError(f"shard {self.shard_index}: {n} documents, but {self.manifest} was computed "
                             f"from {self.n_docs}")
        ex = stats.examples.setdefault("clusters", [])
        for e in self.cluster_examples:
            if len(ex) < MAX_EXAMPLES and [e["kept"], e["removed"]] not in ex:
                ex.append([e["kept"], e["removed"]])


def dedup_filter(manifest: Path, shard_index: int) -> DedupFilter:
    """Phase 3: the step for one shard, from `find_duplicates`' `duplicates.json`."""
    manifest = Path(manifest)
    m = json.loads(manifest.read_text())
    if m.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{manifest}: format {m.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for s in m["shards"]:
        if s["shard_index"] == shard_index:
            removed = np.load(manifest.parent / s["removed_file"])
            return DedupFilter(manifest, shard_index, s["n_docs"], removed, s["examples"])
    raise UserError(f"{manifest}: no shard_index {shard_index} (has {[s['shard_index'] for s in m['shards']]})")


def dedup_documents(docs: list[Document], cfg: DedupConfig | None = None) -> tuple[list[Document], StepStats]:
    """All three phases over one in-memory list (one shard), in a temporary directory."""
    cfg = cfg or DedupConfig()
    docs = list(docs)     # read twice: signatures, then the filter
    t0 = time.perf_counter()
    stats = StepStats("dedup")
    with tempfile.TemporaryDirectory(prefix="lmforge-dedup-") as tmp:
        write_signatures(docs, Path(tmp) / "sig-00000", 0, cfg)
        manifest = find_duplicates([Path(tmp) / "sig-00000"], Path(tmp), cfg)
        kept = list(counted(dedup_filter(manifest, 0), docs, stats))
        stats.counters.update(json.loads(manifest.read_text())["counters"])
    stats.seconds = time.perf_counter() - t0
    return kept, stats
