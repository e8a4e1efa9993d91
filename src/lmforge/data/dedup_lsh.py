"""MinHash-LSH for dedup: the hashes, signatures and sketches of phase 1, and phase 2, `find_duplicates`.

`find_duplicates(sig_dirs, work_dir, cfg)` reads every shard's signatures (dedup.write_signatures),
then for each band sorts (band hash, global index) over all shards; documents in one bucket are
candidate pairs, checked against the sketches, and union-find joins them into clusters. Exact
duplicates (equal text hashes) and URL duplicates are bucketed the same way. The lowest global
index (the first in input order) of a cluster is kept, so the result does not depend on how the
input was split into shards. It holds about 50 bytes per document (one band's hashes and their
sort order, the union-find array), reading one band at a time.

Definitions (a reference implementation in tests/test_dedup.py checks them; normalised text: dedup_text.py):
- Exact hash: xxh3_128 of the normalised text (UTF-8).
- Shingles: word n-grams (`ngram`, default 3). A document with fewer words is one shingle made
  of all its words (an empty document: one empty shingle).
- Shingle hash: each word is hashed once with xxh3_64; a shingle's word hashes are combined as a
  polynomial mod 2^64 (h = h * K + word) and mixed with the murmur3 64-bit finaliser; the top 32
  bits (capped at 2^32 - 2) are the shingle's hash.
- MinHash: datasketch's `scheme="legacy"` permutations, h -> ((a*h + b) mod 2^64) mod (2^61 - 1)
  & (2^32 - 1), with (a, b) drawn exactly as datasketch draws them from `RandomState(seed)`: a
  signature equals `datasketch.MinHash(bands*rows, seed, scheme="legacy", hashfunc=shingle hash)`.
- Band hash: a band's `rows` values combined like the shingle hash (polynomial, finaliser).
- Verification: a band collision is a duplicate only if the documents' estimated Jaccard
  similarity is >= `threshold`. The estimate comes from bottom-k sketches (the `sketch_size`
  smallest distinct shingle hashes), exact for documents of <= sketch_size shingles; beyond, its
  standard deviation is about sqrt(J (1 - J) / sketch_size), 0.018 at J = 0.8 (0.025 with 256,
  which found only 90 % of 1,000-word copies with 3 % of words substituted; 512: 97 %). 100
  MinHash values alone would give 0.04, too coarse to separate 0.7 from 0.85. `threshold=None`
  keeps every band collision (FineWeb's behaviour).

What the defaults catch: substituting a share f of the words, spread apart, changes n shingles
per word, so the n-gram Jaccard is about (1 - n f) / (1 + n f). With 3-grams, threshold 0.8 is
f <= 3.7 % (3 % substituted: J ~ 0.83; an inserted or deleted word counts about as one); 5-grams
at 0.8 stopped at 2.2 % (3 % substituted: J ~ 0.73, the miss issue 14 reported). 20 bands x 5
rows put the LSH S-curve 1 - (1 - J^5)^20 at 0.9996 for J = 0.8 (its midpoint (1/20)^(1/5) = 0.55
sits well below the threshold; the sketches reject the extra candidates, 47 % of pairs at 0.5)
and at 6e-6 for unrelated documents (J = 0.05).

Why hand-written (DESIGN.md): datasketch updates a MinHash once per shingle in Python and its LSH
index lives in one process's memory; datatrove's MinHash stages fail with xxhash 4.1 (their
default) and need spaCy for English words. Here every shingle is hashed once and the permutations
run as numpy array operations over a whole batch: bench/dedup.py measured ~21x the datasketch
recipe's docs/s with recall >= 0.99 on copies with 1-3 % of words substituted and precision 0.998.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, islice, zip_longest
from pathlib import Path

import numpy as np
import xxhash
from pydantic import Field

from lmforge.config import Strict
from lmforge.data.base import MAX_EXAMPLES
from lmforge.errors import UserError

SIG_FORMAT = "lmforge-dedup-signatures/1"
MANIFEST_FORMAT = "lmforge-dedup/1"
REASONS = {1: "exact_duplicate", 2: "near_duplicate", 3: "url_duplicate"}
_EXACT, _NEAR, _URL = 1, 2, 3

_M64 = (1 << 64) - 1
_MERSENNE = (1 << 61) - 1
_K = 0x9E3779B97F4A7C15          # odd multiplier of the polynomial combinations
_FMIX1, _FMIX2 = 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53   # murmur3 fmix64 constants
_MAX_SHINGLE = 0xFFFFFFFE         # 0xFFFFFFFF pads sketches, so shingle hashes stay below it
_SENTINEL = 0xFFFFFFFF
_CHUNK_ELEMS = 1 << 19            # permutation x shingle elements per numpy pass (4 MiB of uint64)

META_DTYPE = np.dtype([("exact", "<u8", (2,)), ("url", "<u8"), ("id", "<u8"), ("has_url", "u1")])
REMOVED_DTYPE = np.dtype([("pos", "<u8"), ("reason", "u1"), ("id", "<u8")])


class DedupConfig(Strict):
    """Which duplicates to remove and the MinHash-LSH parameters (module docstring: what the defaults catch).

    Defaults: 3-gram shingles verified at Jaccard 0.8 (up to ~3.7 % of words substituted); 20 x 5
    bands make a pair at 0.8 a candidate with probability 0.9996; 512-hash sketches verify it.
    """

    ngram: int = Field(3, ge=1, description="words per shingle")
    bands: int = Field(20, ge=1, description="LSH bands; a pair is a candidate if one band is equal")
    rows: int = Field(5, ge=1, description="MinHash values per band; bands * rows hashes in all")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations (datasketch's)")
    exact: bool = Field(True, description="remove documents whose normalised text equals an earlier one's")
    near: bool = Field(True, description="remove MinHash-LSH near-duplicates")
    url: bool = Field(False, description="remove documents whose normalised URL equals an earlier one's")
    threshold: float | None = Field(0.8, gt=0, le=1, description="Jaccard of the ngram shingle sets (estimated "
                                                                  "from the sketches) a band collision needs to "
                                                                  "count; null = every collision")
    sketch_size: int = Field(512, ge=1, description="bottom-k sketch size used to verify candidate pairs")

    def signature_keys(self) -> dict:
        """The settings phase 1 and phase 2 must agree on."""
        return {k: getattr(self, k) for k in ("ngram", "bands", "rows", "seed", "sketch_size")}


# ---------------------------------------------------------------- hashing

def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place on a uint64 array."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(_FMIX1)
    x ^= x >> np.uint64(33)
    x *= np.uint64(_FMIX2)
    x ^= x >> np.uint64(33)
    return x


@lru_cache(maxsize=8)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) as columns, drawn in datasketch's order (MinHash._init_permutations, legacy scheme)."""
    gen = np.random.RandomState(seed)
    ab = np.array([(gen.randint(1, _MERSENNE, dtype=np.uint64), gen.randint(0, _MERSENNE, dtype=np.uint64))
                   for _ in range(num_perm)], dtype=np.uint64).T
    return ab[0][:, None].copy(), ab[1][:, None].copy()


def shingle_hashes(word_lists: list[list[bytes]], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """All shingle hashes of a batch (uint64 < 2^32, doc after doc) and each doc's first index."""
    n_docs = len(word_lists)
    lengths = np.fromiter(map(len, word_lists), np.int64, n_docs)
    total = int(lengths.sum())
    words = np.fromiter(map(xxhash.xxh3_64_intdigest, chain.from_iterable(word_lists)), np.uint64, total)
    long_counts = np.where(lengths >= ngram, lengths - ngram + 1, 0)
    k = np.uint64(_K)
    if total >= ngram and long_counts.any():
        win = words[: total - ngram + 1].copy()
        for j in range(1, ngram):
            win *= k
            win += words[j: total - ngram + 1 + j]
        doc_of = np.repeat(np.arange(n_docs), lengths)[: total - ngram + 1]
        word_start = np.cumsum(lengths) - lengths
        pos = np.arange(total - ngram + 1) - word_start[doc_of]
        hashes = win[pos < long_counts[doc_of]]      # windows that stay inside one document
    else:
        hashes = np.empty(0, np.uint64)
    short = np.flatnonzero(lengths < ngram)
    if short.size:                                    # fewer words than ngram: one shingle of all words
        word_start = np.cumsum(lengths) - lengths
        vals = []
        for d in short.tolist():
            h = 0
            for w in words[word_start[d]: word_start[d] + lengths[d]].tolist():
                h = (h * _K + w) & _M64
            vals.append(h)
        before = (np.cumsum(long_counts) - long_counts)[short]
        hashes = np.insert(hashes, before, np.array(vals, dtype=np.uint64))
    hashes = _fmix64(hashes) >> np.uint64(32)
    np.minimum(hashes, np.uint64(_MAX_SHINGLE), out=hashes)
    counts = np.maximum(long_counts, 1)
    return hashes, np.cumsum(counts) - counts


def _mod_mersenne61(x: np.ndarray, tmp: np.ndarray) -> None:
    """x %= 2^61 - 1 in place, for any uint64 x, with shifts and adds instead of a division:
    x = q * 2^61 + r is congruent to q + r, which is < 2 * (2^61 - 1)."""
    p = np.uint64(_MERSENNE)
    np.right_shift(x, np.uint64(61), out=tmp)
    x &= p
    x += tmp
    np.subtract(x, p, out=x, where=x >= p)


def minhash_signatures(hashes: np.ndarray, starts: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """(n_docs, num_perm) uint32 MinHash signatures of the segments `hashes[starts[i]:starts[i+1]]`.

    The permutations run over chunks of the whole batch's shingles at once (Mersenne reduction with
    shifts, not a division); a document that spans chunks is merged with np.minimum.
    """
    a, b = _permutations(num_perm, seed)
    m32 = np.uint64(0xFFFFFFFF)
    n_docs, n = len(starts), len(hashes)
    out = np.full((num_perm, n_docs), 0xFFFFFFFF, np.uint64)
    chunk = max(1, _CHUNK_ELEMS // num_perm)
    buf = np.empty((num_perm, min(chunk, n)), np.uint64)
    tmp = np.empty_like(buf)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)
        x, t = buf[:, : c1 - c0], tmp[:, : c1 - c0]
        np.multiply(a, hashes[c0:c1], out=x)          # wraps mod 2^64, as datasketch's does
        x += b
        _mod_mersenne61(x, t)
        x &= m32
        d0 = int(np.searchsorted(starts, c0, "right")) - 1
        d1 = int(np.searchsorted(starts, c1 - 1, "right"))
        part = np.minimum.reduceat(x, np.maximum(starts[d0:d1], c0) - c0, axis=1)
        np.minimum(out[:, d0:d1], part, out=out[:, d0:d1])
    return out.T.astype(np.uint32)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n_docs, bands) uint64: each band's `rows` MinHash values combined into one hash."""
    v = signatures[:, : bands * rows].reshape(len(signatures), bands, rows).astype(np.uint64)
    h = v[:, :, 0].copy()
    for r in range(1, rows):
        h *= np.uint64(_K)
        h += v[:, :, r]
    return _fmix64(h)


def bottom_k_sketches(hashes: np.ndarray, starts: np.ndarray, k: int) -> np.ndarray:
    """(n_docs, k) uint32: each document's k smallest distinct shingle hashes, ascending, padded."""
    n_docs = len(starts)
    counts = np.diff(np.append(starts, len(hashes)))
    key = (np.repeat(np.arange(n_docs, dtype=np.uint64), counts) << np.uint64(32)) | hashes
    key.sort()
    keep = np.ones(len(key), bool)
    keep[1:] = key[1:] != key[:-1]
    key = key[keep]
    doc = (key >> np.uint64(32)).astype(np.int64)
    rank = np.arange(len(key)) - np.searchsorted(doc, np.arange(n_docs))[doc]
    sel = rank < k
    out = np.full((n_docs, k), _SENTINEL, np.uint32)
    out[doc[sel], rank[sel]] = (key[sel] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    return out


def sketch_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bottom-k Jaccard estimates for row pairs of two (n, k) sketch arrays:
    |X & A & B| / |X| with X the k smallest of A | B (exact when |A | B| <= k)."""
    k = a.shape[1]
    m = np.sort(np.concatenate([a, b], axis=1), axis=1)
    valid = m != _SENTINEL
    both = (m[:, 1:] == m[:, :-1]) & valid[:, 1:]
    new = valid.copy()
    new[:, 1:] &= ~both
    rank = np.cumsum(new, axis=1)
    inter = (both & (rank[:, 1:] <= k)).sum(axis=1)
    return inter / np.maximum(np.minimum(rank[:, -1], k), 1)


# ---------------------------------------------------------------- phase 2: global duplicates

@dataclass
class _Shard:
    path: Path
    index: int
    n_docs: int
    offset: int = 0
    near: bool = True
    bands: np.ndarray | None = None     # memmaps
    sketch: np.ndarray | None = None
    meta: np.ndarray | None = None


def _open_shard(path: Path, cfg: DedupConfig) -> _Shard:
    path = Path(path)
    hp = path / "header.json"
    if not hp.is_file():
        raise UserError(f"{path}: no header.json; not a finished write_signatures output directory")
    h = json.loads(hp.read_text())
    if h.get("format") != SIG_FORMAT:
        raise UserError(f"{hp}: format {h.get('format')!r}, expected {SIG_FORMAT!r}")
    for key, want in cfg.signature_keys().items():
        if h.get(key) != want:
            raise UserError(f"{hp}: {key}={h.get(key)!r} but the dedup config has {key}={want!r}; "
                             "rewrite the signatures with the same config")
    for key, what in (("near", "band hashes"), ("url", "URL hashes")):
        if getattr(cfg, key) and not h[key]:
            raise UserError(f"{hp}: written with {key}=false, so it has no {what}; the config has {key}=true")
    s = _Shard(path, h["shard_index"], h["n_docs"], near=h["near"])

    def mm(name, dtype, width=None):
        shape = (s.n_docs,) if width is None else (s.n_docs, width)
        expect = int(np.prod(shape)) * np.dtype(dtype).itemsize
        size = (path / name).stat().st_size
        if size != expect:
            raise UserError(f"{path / name}: {size} bytes, expected {expect} for {s.n_docs} documents")
        return np.memmap(path / name, dtype=dtype, mode="r", shape=shape) if expect else np.zeros(shape, dtype)

    s.meta = mm("meta.bin", META_DTYPE)
    if cfg.near:
        s.bands = mm("bands.bin", "<u8", cfg.bands)
        s.sketch = mm("sketch.bin", "<u4", cfg.sketch_size)
    return s


def _compress(parent: np.ndarray) -> None:
    """Pointer jumping until every entry points at its root."""
    while True:
        gp = parent[parent]
        if np.array_equal(gp, parent):
            return
        parent[:] = gp


def _union(parent: np.ndarray, u: np.ndarray, v: np.ndarray) -> None:
    """Join the components of each pair (u[i], v[i]); a root is always its component's minimum."""
    while u.size:
        _compress(parent)
        ru, rv = parent[u], parent[v]
        diff = ru != rv
        if not diff.any():
            return
        u, v, ru, rv = u[diff], v[diff], ru[diff], rv[diff]
        np.minimum.at(parent, np.maximum(ru, rv), np.minimum(ru, rv))


def _bucket_pairs(keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows sharing all `keys` (least significant first) form a bucket, ordered by row. Returns,
    for every row after its bucket's first, (bucket's first row, previous row, row): pairing each
    member with both keeps the number of pairs linear, even for huge buckets."""
    n = len(keys[0])
    if n < 2:
        return (np.empty(0, np.int64),) * 3
    order = np.lexsort([np.arange(n), *keys])     # by key, then by row (= input order)
    same = np.ones(n - 1, bool)
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    member = np.flatnonzero(same) + 1
    first = np.maximum.accumulate(np.where(np.append(True, ~same), np.arange(n), 0))
    return order[first[member]], order[member - 1], order[member]


def _pairs(rep: np.ndarray, prev: np.ndarray, cur: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    extra = prev != rep
    return np.concatenate([rep, prev[extra]]), np.concatenate([cur, cur[extra]])


class _Sketches:
    """Bottom-k sketch rows by global index, read from the shards' memmaps."""

    def __init__(self, shards: list[_Shard]):
        self.shards, self.offsets = shards, np.array([s.offset for s in shards])

    def rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), self.shards[0].sketch.shape[1]), np.uint32)
        which = np.searchsorted(self.offsets, idx, "right") - 1
        for w in np.unique(which):
            m = which == w
            s = self.shards[w]
            out[m] = s.sketch[idx[m] - s.offset]
        return out

    def jaccard(self, u: np.ndarray, v: np.ndarray, chunk: int = 4096) -> np.ndarray:
        return np.concatenate([sketch_jaccard(self.rows(u[i:i + chunk]), self.rows(v[i:i + chunk]))
                               for i in range(0, len(u), chunk)] or [np.empty(0)])


def find_duplicates(sig_dirs: list[Path], work_dir: Path, cfg: DedupConfig | None = None) -> Path:
    """Phase 2: decide, over all shards, which documents to remove; returns `work_dir/duplicates.json`.

    Writes `removed-NNNNN.npy` (REMOVED_DTYPE: position in the shard, reason, id hash; sorted) for
    every shard and the manifest `duplicates.json` (config, counts, cluster examples per shard).
    """
    cfg = cfg or DedupConfig()
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    shards = _open_shards(sig_dirs, cfg)
    n = sum(s.n_docs for s in shards)
    parent = np.arange(n, dtype=np.int64)
    reason = np.zeros(n, np.uint8)
    counters: Counter = Counter()
    kept_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}   # reason -> (removed, kept) sorted
    if cfg.exact and n:
        _join_exact(shards, parent, reason, kept_of)
    if cfg.near and n:
        _join_near(shards, parent, cfg, counters)
    _compress(parent)
    clustered = parent != np.arange(n)
    reason[clustered & (reason == 0)] = _NEAR
    counters["clusters"] = int(len(np.unique(parent[clustered])))
    if cfg.url and n:
        _mark_url_duplicates(shards, reason, kept_of)
    kept_of = {k: (r[np.argsort(r)], kp[np.argsort(r)]) for k, (r, kp) in kept_of.items()}
    return _write_removed(work_dir, shards, cfg, reason, parent, kept_of, counters)


def _open_shards(sig_dirs: list[Path], cfg: DedupConfig) -> list[_Shard]:
    """Every shard's signatures in shard_index order, each with the global index of its first document."""
    shards = sorted((_open_shard(p, cfg) for p in sig_dirs), key=lambda s: s.index)
    for a, b in zip(shards, shards[1:]):
        if a.index == b.index:
            raise UserError(f"{a.path} and {b.path} both hold shard_index {a.index}")
    off = 0
    for s in shards:
        s.offset, off = off, off + s.n_docs
    return shards


def _column(shards: list[_Shard], get) -> np.ndarray:
    """One signature column over all shards, in global order."""
    return np.concatenate([np.asarray(get(s)) for s in shards])


def _join_exact(shards: list[_Shard], parent: np.ndarray, reason: np.ndarray, kept_of: dict) -> None:
    """Exact duplicates: equal text hashes join one cluster; all but the first are removed."""
    ex = _column(shards, lambda s: s.meta["exact"])
    rep, prev, cur = _bucket_pairs([ex[:, 1], ex[:, 0]])
    del ex
    reason[cur] = _EXACT
    kept_of[_EXACT] = (cur, rep)
    _union(parent, *_pairs(rep, prev, cur))


def _join_near(shards: list[_Shard], parent: np.ndarray, cfg: DedupConfig, counters: Counter) -> None:
    """Near duplicates: documents colliding in a band join one cluster if their sketches agree (cfg.threshold)."""
    sketches = _Sketches(shards)
    for band in range(cfg.bands):
        u, v = _pairs(*_bucket_pairs([_column(shards, lambda s: s.bands[:, band])]))
        _compress(parent)
        todo = parent[u] != parent[v]                 # already in one cluster: nothing to check
        u, v = u[todo], v[todo]
        counters["candidate_pairs"] += len(u)
        if cfg.threshold is not None and len(u):
            ok = sketches.jaccard(u, v) >= cfg.threshold
            counters["rejected_pairs"] += int((~ok).sum())
            u, v = u[ok], v[ok]
        _union(parent, u, v)


def _mark_url_duplicates(shards: list[_Shard], reason: np.ndarray, kept_of: dict) -> None:
    """URL duplicates: documents not removed already whose normalised URL equals an earlier one's."""
    idx = np.flatnonzero(_column(shards, lambda s: s.meta["has_url"]))
    rep, _, cur = _bucket_pairs([_column(shards, lambda s: s.meta["url"])[idx]])
    rep, cur = idx[rep], idx[cur]
    fresh = reason[cur] == 0
    reason[cur[fresh]] = _URL
    kept_of[_URL] = (cur[fresh], rep[fresh])


def _write_removed(work_dir: Path, shards: list[_Shard], cfg: DedupConfig, reason: np.ndarray, parent: np.ndarray,
                   kept_of: dict, counters: Counter) -> Path:
    """`removed-NNNNN.npy` per shard, then the manifest `duplicates.json` (via a temp file and a rename)."""
    for code, name in REASONS.items():
        counters[name] = int((reason == code).sum())
    manifest = {"format": MANIFEST_FORMAT, "config": cfg.model_dump(), "n_docs": len(reason),
                "removed": {name: counters.pop(name) for name in REASONS.values()},
                "counters": dict(counters), "shards": []}
    examples = _examples(shards, reason, parent, kept_of, cfg)
    for s in shards:
        r = reason[s.offset: s.offset + s.n_docs]
        pos = np.flatnonzero(r)
        rec = np.zeros(len(pos), REMOVED_DTYPE)
        rec["pos"], rec["reason"], rec["id"] = pos, r[pos], np.asarray(s.meta["id"])[pos]
        name = f"removed-{s.index:05d}.npy"
        np.save(work_dir / name, rec)
        manifest["shards"].append({"shard_index": s.index, "n_docs": s.n_docs, "signatures": str(s.path),
                                   "removed_file": name, "removed": len(pos), "examples": examples[s.index]})
    out = work_dir / "duplicates.json"
    tmp = work_dir / "duplicates.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, out)
    return out


def _examples(shards: list[_Shard], reason, parent, kept_of, cfg) -> dict[int, list[dict]]:
    """Up to MAX_EXAMPLES (kept, removed) pairs per reason and shard, with ids and similarity."""
    offsets = np.array([s.offset for s in shards])

    def kept(code: int, g: int) -> int:
        if code == _NEAR:
            return int(parent[g])
        removed, kept_arr = kept_of[code]
        return int(kept_arr[np.searchsorted(removed, g)])

    def key(g: int) -> list[int]:
        s = shards[int(np.searchsorted(offsets, g, "right")) - 1]
        return [s.index, g - s.offset]

    picks = {}
    for s in shards:
        r = reason[s.offset: s.offset + s.n_docs]
        per_reason = [[(code, kept(code, s.offset + p), s.offset + p)
                       for p in np.flatnonzero(r == code)[:MAX_EXAMPLES].tolist()] for code in (_NEAR, _EXACT, _URL)]
        # interleaved (near, exact, url, near, ...) so the first few show every kind
        picks[s.index] = [x for group in zip_longest(*per_reason) for x in group if x is not None]
    wanted = {g for v in picks.values() for _, a, b in v for g in (a, b)}
    ids: dict[int, str] = {}
    for s in shards:
        mine = {g - s.offset for g in wanted if s.offset <= g < s.offset + s.n_docs}
        if mine:
            with open(s.path / "ids.jsonl", encoding="utf-8") as f:
                for p, line in enumerate(islice(f, max(mine) + 1)):
                    if p in mine:
                        ids[s.offset + p] = json.loads(line)
    sk = _Sketches(shards) if cfg.near else None
    return {idx: [{"reason": REASONS[code], "kept": ids[a], "removed": ids[b], "kept_key": key(a),
                   "removed_key": key(b),
                   "similarity": round(float(sk.jaccard(np.array([a]), np.array([b]))[0]), 4) if sk else None}
                  for code, a, b in v] for idx, v in picks.items()}
