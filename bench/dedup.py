"""Near-duplicate removal: lmforge's MinHash-LSH against the guide's datasketch recipe, one run.

Corpus: real text cut into 200-word documents (`--words`: `../shared/data/alpaca_5000.json`
instruction + input + output when present, the docstrings and comments of the Python standard
library's own .py files, then GSM8K problems when more are needed), then planted copies of random
base documents (35 % of the corpus), in equal numbers of seven kinds:
- substitutions: 1, 2 and 3 % of the words (2, 4, 6 of 200) replaced by other words at distinct
  random positions: duplicates a user would want removed;
- Jaccard targets: random word edits (substitute, insert, delete) until the true Jaccard
  similarity on 5-gram shingles (lmforge's normalised words) falls to 0.9, 0.85, 0.7 or 0.5
  (about 1, 2, 4 and 8 % of the words edited): the last must be kept.

Ground truth: the word-level edit distance (Levenshtein over whitespace-separated words) divided
by the longer document's word count, computed exactly for every pair whose word 3-gram sets have
Jaccard >= 0.5 (every pair within 5 % edits has; so natural duplicates in the real text count too):
- recall: of the documents within 3 % edits of an earlier document, the share removed; and per
  planted kind, the share of its pairs of which a document was removed;
- precision: a removed document is right if some kept document is within 5 % edits of it
  (3-5 % is a tolerance band: removing or keeping such a pair is both accepted).
Every method keeps the first document of a cluster in input order.

Methods: lmforge `dedup_documents` with its defaults (or the `key=value` settings given), the
same without verification (`threshold=null`, FineWeb's behaviour), lmforge's previous defaults
(5-grams, 14 x 8 bands, verified at 0.8), and the guide's recipe: datasketch
`MinHash(num_perm=128)` per document (one `update` per lowercased whitespace-word 5-gram) +
`MinHashLSH(threshold=0.8)`, querying then inserting each document. datatrove's MinHash stages
(signature, buckets, cluster, filter; 14 x 8, 5-grams, one task per stage, 14 bucket tasks) run
when datatrove is installed: its default xxhash path is tried first and the failure reported
(xxhash 4.1: "Strings must be encoded before hashing"), then sha1; its English word tokenizer
needs spaCy, so it is given a whitespace tokenizer through its custom-tokenizer hook. Each method
runs `--repeat` times; docs/s is the median.

    python bench/dedup.py [--n 6000] [--words 200] [--seed 0] [--repeat 3] [--no-datatrove] [lmforge key=value ...]
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import json
import random
import re
import statistics
import sysconfig
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from _bench_util import stderr_to
from lmforge.config import load_config
from lmforge.data.base import Document
from lmforge.data.dedup import DedupConfig, dedup_documents, normalized_words
from lmforge.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca_5000.json"
GSM8K = SHARED / "gsm8k_train.jsonl"
SUBSTITUTIONS = (0.01, 0.02, 0.03)
TARGETS = (0.9, 0.85, 0.7, 0.5)
KINDS = [("subst", f) for f in SUBSTITUTIONS] + [("jaccard", t) for t in TARGETS]
PLANTED_SHARE = 0.35
DUPLICATE = 0.03      # within this share of words edited: must be removed
TOLERATED = 0.05      # within this share: removing it is not an error
NGRAM = 5             # the Jaccard targets' and the datasketch recipe's shingles
RECIPE = "datasketch recipe (128 perm, LSH 0.8)"


def stdlib_words(limit: int):
    """Words of the standard library's docstrings and comments, file by file in sorted order."""
    n = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts = [ast.get_docstring(node) or "" for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        texts += [line.strip()[1:] for line in source.splitlines() if line.lstrip().startswith("#")]
        for text in texts:
            words = text.split()
            n += len(words)
            yield from words
        if n >= limit:
            return


def alpaca_words():
    if not ALPACA.is_file():
        return
    for r in json.loads(ALPACA.read_text()):
        yield from f"{r['instruction']} {r.get('input', '')} {r['output']}".split()


def gsm8k_words():
    if not GSM8K.is_file():
        return
    for line in GSM8K.read_text().splitlines():
        r = json.loads(line)
        yield from f"{r['question']} {r['answer']}".split()


def base_documents(n: int, words: int) -> list[str]:
    docs, cur = [], []
    for source in (alpaca_words(), stdlib_words(n * words), gsm8k_words()):
        for w in source:
            cur.append(w)
            if len(cur) == words:
                docs.append(" ".join(cur))
                cur = []
                if len(docs) == n:
                    return docs
    if len(docs) < n:
        raise SystemExit(f"only {len(docs)} base documents of real text available, asked for {n}; lower --n")
    return docs


def shingles(text: str) -> set[bytes]:
    w = normalized_words(text)
    return {b" ".join(w[i:i + NGRAM]) for i in range(max(len(w) - NGRAM + 1, 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def plant(text: str, target: float, vocab: list[str], rng: random.Random) -> str:
    """Edit random words until the 5-gram Jaccard with `text` falls to the target; keep the closer
    of the last two versions."""
    src = shingles(text)
    words = text.split()
    prev, prev_j = text, 1.0
    while True:
        op = rng.random()
        i = rng.randrange(len(words))
        if op < 0.6:
            words[i] = rng.choice(vocab)
        elif op < 0.8:
            words.insert(i, rng.choice(vocab))
        elif len(words) > NGRAM + 1:
            del words[i]
        cur = " ".join(words)
        j = jaccard(src, shingles(cur))
        if j <= target:
            return cur if target - j <= prev_j - target else prev
        prev, prev_j = cur, j


def substitute(text: str, share: float, vocab: list[str], rng: random.Random) -> str:
    """Replace round(share * words) words at distinct random positions by other words."""
    words = text.split()
    for i in rng.sample(range(len(words)), round(share * len(words))):
        while (w := rng.choice(vocab)) == words[i]:
            pass
        words[i] = w
    return " ".join(words)


def build_corpus(n: int, words: int, seed: int) -> tuple[list[Document], list[tuple[str, str, tuple]]]:
    """Base documents and planted copies, shuffled; planted: (base id, copy id, kind)."""
    rng = random.Random(seed)
    n_planted = int(n * PLANTED_SHARE)
    base = base_documents(n - n_planted, words)
    vocab = sorted({w for t in base[:500] for w in t.split()})
    docs = [Document(f"b{i}", t) for i, t in enumerate(base)]
    planted = []
    for i, src in enumerate(rng.sample(range(len(base)), n_planted)):
        kind = KINDS[i % len(KINDS)]
        text = substitute(base[src], kind[1], vocab, rng) if kind[0] == "subst" else \
            plant(base[src], kind[1], vocab, rng)
        docs.append(Document(f"p{i}", text))
        planted.append((f"b{src}", f"p{i}", kind))
    rng.shuffle(docs)
    return docs, planted


def edit_distances(a: list[np.ndarray], b: list[np.ndarray]) -> np.ndarray:
    """Levenshtein distances of the int sequences a[p], b[p], all pairs at once: one dynamic-
    programming row per position of a, the insertion chain as a running minimum."""
    n = len(a)
    la = np.array([len(x) for x in a])
    lb = np.array([len(x) for x in b])
    if n == 0:
        return np.zeros(0, np.int64)
    A = np.full((n, la.max()), -1, np.int64)
    B = np.full((n, lb.max()), -2, np.int64)
    for p in range(n):
        A[p, :la[p]], B[p, :lb[p]] = a[p], b[p]
    col = np.arange(lb.max() + 1)
    prev = np.tile(col, (n, 1))
    out = np.where(la == 0, lb, 0)
    for i in range(1, la.max() + 1):
        cur = np.empty_like(prev)     # deletion or substitution first, then the insertion chain
        cur[:, 0] = i
        np.minimum(prev[:, 1:] + 1, prev[:, :-1] + (A[:, i - 1:i] != B), out=cur[:, 1:])
        cur = np.minimum.accumulate(cur - col, axis=1) + col
        done = la == i
        out[done] = cur[done, lb[done]]
        prev = cur
    return out


def edit_neighbours(docs: list[Document], also: list[tuple[int, int]], floor: float = 0.5,
                    batch: int = 512) -> list[dict[int, float]]:
    """For each document, the word edit ratio (Levenshtein / longer length) with every document
    whose word 3-gram set has Jaccard >= floor with its own, and for the pairs `also`."""
    ids: dict[str, int] = {}
    seqs = [np.array([ids.setdefault(w, len(ids)) for w in d.text.split()], np.int64) for d in docs]
    sets = [{tuple(s[i:i + 3]) for i in range(max(len(s) - 2, 1))} for s in map(list, seqs)]
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    pairs = {tuple(sorted(p)) for p in also}
    for i, s in enumerate(sets):
        shared = Counter(j for sh in s for j in index[sh] if j > i)
        pairs.update((i, j) for j, c in shared.items() if c / (len(s) + len(sets[j]) - c) >= floor)
    pairs = sorted(pairs)
    out: list[dict[int, float]] = [dict() for _ in docs]
    for k in range(0, len(pairs), batch):
        part = pairs[k:k + batch]
        dist = edit_distances([seqs[i] for i, _ in part], [seqs[j] for _, j in part])
        for (i, j), d in zip(part, dist.tolist()):
            out[i][j] = out[j][i] = d / max(len(seqs[i]), len(seqs[j]), 1)
    return out


def score(docs, kept_ids: set[str], nb) -> dict:
    """Precision and recall against the word edit ratio (module docstring)."""
    kept = [d.id in kept_ids for d in docs]
    removed = [i for i, k in enumerate(kept) if not k]
    right = sum(any(kept[j] and r <= TOLERATED for j, r in nb[i].items()) for i in removed)
    should = [i for i in range(len(docs)) if any(j < i and r <= DUPLICATE for j, r in nb[i].items())]
    found = sum(not kept[i] for i in should)
    return {"removed": len(removed), "precision": right / len(removed) if removed else 1.0,
            "recall": found / len(should) if should else 1.0}


def timed(fn, docs, repeat: int) -> tuple[set[str], float, list[float]]:
    """The kept ids (of the first run), the median seconds of `repeat` runs and every run's."""
    kept, secs = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        k = fn(docs)
        secs.append(time.perf_counter() - t0)
        kept = k if kept is None else kept
    return kept, statistics.median(secs), secs


def run_lmforge(cfg: DedupConfig):
    return lambda docs: {d.id for d in dedup_documents(docs, cfg)[0]}


def run_datasketch(docs) -> set[str]:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    kept = set()
    for d in docs:
        words = d.text.lower().split()
        m = MinHash(num_perm=128)
        for sh in {" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))}:
            m.update(sh.encode("utf-8"))
        if not lsh.query(m):
            kept.add(d.id)
        lsh.insert(d.id, m)
    return kept


def run_datatrove(hash_fc: str | None):
    import tempfile

    from datatrove.data import Document as DTDocument
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):   # datatrove's English default needs spaCy; the recipe splits on spaces
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [m.span() for m in re.finditer(r"\S+", text)]

    cfg = MinhashConfig(hash_config=HashConfig(precision=64, **({"hash_fc": hash_fc} if hash_fc else {})))

    def run(docs) -> set[str]:
        dt_docs = [DTDocument(text=d.text, id=d.id) for d in docs]
        kept: set[str] = set()

        def collect(data, rank=0, world_size=1):
            for doc in data:
                kept.add(doc.id)
                yield doc

        with tempfile.TemporaryDirectory() as tmp, stderr_to(Path(os.devnull)):
            stages = [[lambda data, rank=0, world_size=1: iter(dt_docs),
                       MinhashDedupSignature(f"{tmp}/sig", config=cfg, language=Whitespace())],
                      [MinhashDedupBuckets(f"{tmp}/sig", f"{tmp}/buckets", config=cfg)],
                      [MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=cfg)],
                      [lambda data, rank=0, world_size=1: iter(dt_docs), MinhashDedupFilter(f"{tmp}/remove"),
                       collect]]
            for i, pipeline in enumerate(stages):
                tasks = cfg.num_buckets if i == 1 else 1
                LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{tmp}/logs{i}").run()
        return kept

    return run


def describe(cfg: DedupConfig) -> str:
    check = f"verified >= {cfg.threshold}" if cfg.threshold is not None else "unverified"
    return f"{cfg.ngram}-grams, {cfg.bands}x{cfg.rows}, {check}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=6000, help=f"documents in the corpus ({PLANTED_SHARE:.0%} planted)")
    ap.add_argument("--words", type=int, default=200, help="words per base document")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per method (docs/s is the median)")
    ap.add_argument("--no-datatrove", action="store_true", help="skip datatrove's MinHash stages")
    ap.add_argument("overrides", nargs="*", help="lmforge dedup settings (key=value) over its defaults")
    args = ap.parse_args()
    try:
        cfg = load_config(DedupConfig, overrides=args.overrides)
    except UserError as e:
        raise SystemExit(f"bench/dedup.py: {e}") from None

    t0 = time.perf_counter()
    docs, planted = build_corpus(args.n, args.words, args.seed)
    index = {d.id: i for i, d in enumerate(docs)}
    nb = edit_neighbours(docs, [(index[b], index[c]) for b, c, _ in planted])
    print(f"corpus: {len(docs):,} documents ({len(planted):,} planted), built and scored in "
          f"{time.perf_counter() - t0:.1f} s")

    methods = {f"lmforge ({describe(cfg)})": run_lmforge(cfg),
               f"lmforge ({describe(cfg.model_copy(update={'threshold': None}))}: FineWeb)":
                   run_lmforge(cfg.model_copy(update={"threshold": None})),
               "lmforge's previous defaults (5-grams, 14x8, verified >= 0.8)":
                   run_lmforge(DedupConfig(ngram=5, bands=14, rows=8, threshold=0.8, sketch_size=256)),
               RECIPE: run_datasketch}
    notes = []
    if args.no_datatrove:
        pass
    elif importlib.util.find_spec("datatrove") is None:
        notes.append("datatrove is not installed (pip install datatrove): not measured")
    else:
        for hash_fc in (None, "sha1"):
            try:
                run_datatrove(hash_fc)(docs[:50])
                methods[f"datatrove 0.10 MinHash ({hash_fc or 'default xxhash'})"] = run_datatrove(hash_fc)
                break
            except Exception as e:   # report and move on: the peer failing is a result
                notes.append(f"datatrove with {hash_fc or 'its default xxhash'} failed: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    results = {name: timed(fn, docs, args.repeat) for name, fn in methods.items()}

    peer = len(docs) / results[RECIPE][1]
    levels = [k for k in KINDS if k[0] == "subst"]
    print(f"\n| method | removed | docs/s (median of {args.repeat}) | precision | recall | "
          + " | ".join(f"recall {k[1]:.0%}" for k in levels) + " | ratio vs recipe |")
    print("|---|---|---|---|---|" + "---|" * len(levels) + "---|")
    for name, (kept, secs, _) in results.items():
        s = score(docs, kept, nb)
        per = [sum(b not in kept or c not in kept for b, c, k in planted if k == lv) /
               sum(k == lv for _, _, k in planted) for lv in levels]
        rate = len(docs) / secs
        print(f"| {name} | {s['removed']:,} | {rate:,.0f} | {s['precision']:.3f} | {s['recall']:.3f} | "
              + " | ".join(f"{r:.3f}" for r in per) + f" | {rate / peer:.1f}x |")
    print("\nseconds per run: " + "; ".join(f"{name}: " + ", ".join(f"{x:.2f}" for x in secs)
                                       for name, (_, _, secs) in results.items()))

    print("\nplanted pairs removed, by kind (words edited and 5-gram Jaccard: mean [min, max]):")
    print("| kind | pairs | words edited | 5-gram J | " + " | ".join(results) + " |")
    print("|---|---|---|---|" + "---|" * len(results))
    for kind in KINDS:
        rows = [(b, c) for b, c, k in planted if k == kind]
        edits = [nb[index[c]][index[b]] for b, c in rows]
        js = [jaccard(shingles(docs[index[b]].text), shingles(docs[index[c]].text)) for b, c in rows]
        cells = [f"{sum(b not in kept or c not in kept for b, c in rows) / len(rows):.3f}"
                 for kept, _, _ in results.values()]
        label = f"{kind[1]:.0%} substituted" if kind[0] == "subst" else f"5-gram J {kind[1]}"
        print(f"| {label} | {len(rows)} | {statistics.mean(edits):.1%} [{min(edits):.1%}, {max(edits):.1%}] | "
              f"{statistics.mean(js):.3f} [{min(js):.3f}, {max(js):.3f}] | " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
