"""Near-duplicate removal: lmforge's MinHash-LSH against the guide's datasketch recipe, one run.

Corpus: real text cut into 200-word documents (`../shared/data/alpaca_5000.json` instruction +
input + output when present, the docstrings and comments of the Python standard library's own .py
files, then GSM8K problems when more are needed), then
near-duplicates planted by random word edits (substitute, insert, delete) of a random base
document until the true Jaccard similarity on 5-gram word shingles (lmforge's normalised words)
reaches a target: 0.9, 0.85, 0.7, 0.5 in turn. The true Jaccard of every pair that shares a
shingle is computed exactly (inverted index), so natural duplicates in the real text count too.

Scores, at Jaccard >= 0.8 (every method keeps the first document in input order):
- precision: a removed document is right if its true Jaccard with some kept document is >= 0.8;
- recall: of the documents whose true Jaccard with an earlier document is >= 0.8, the share removed.

Methods: lmforge `dedup_documents` (defaults: 5-grams, 14 bands x 8 rows, verified at 0.8), the
same without verification (FineWeb's behaviour), and the guide's recipe: datasketch
`MinHash(num_perm=128)` per document (one `update` per shingle) + `MinHashLSH(threshold=0.8)`,
querying then inserting each document. datatrove's MinHash stages (signature, buckets, cluster,
filter; 14 x 8, 5-grams, one task per stage, 14 bucket tasks) run when datatrove is installed:
its default xxhash path is tried first and the failure reported (xxhash 4.1: "Strings must be
encoded before hashing"), then sha1; its English word tokenizer needs spaCy, so it is given a
whitespace tokenizer through its custom-tokenizer hook.

    python bench/dedup.py [--n 5000] [--seed 0] [--no-datatrove]
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import json
import random
import re
import sysconfig
import time
from collections import Counter, defaultdict
from pathlib import Path

from _bench_util import stderr_to
from lmforge.data.base import Document
from lmforge.data.dedup import DedupConfig, dedup_documents, normalized_words

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "alpaca_5000.json"
GSM8K = SHARED / "gsm8k_train.jsonl"
TARGETS = (0.9, 0.85, 0.7, 0.5)
THRESHOLD = 0.8
NGRAM = 5
DOC_WORDS = 200


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


def base_documents(n: int) -> list[str]:
    docs, cur = [], []
    for source in (alpaca_words(), stdlib_words(n * DOC_WORDS), gsm8k_words()):
        for w in source:
            cur.append(w)
            if len(cur) == DOC_WORDS:
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


def plant(text: str, target: float, vocab: list[str], rng: random.Random) -> tuple[str, float]:
    """Edit random words until the Jaccard with `text` falls to the target; keep the closer of
    the last two versions."""
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
            return (cur, j) if target - j <= prev_j - target else (prev, prev_j)
        prev, prev_j = cur, j


def build_corpus(n: int, seed: int) -> tuple[list[Document], list[tuple[str, str, float, float]]]:
    rng = random.Random(seed)
    n_planted = int(n * 0.3)
    base = base_documents(n - n_planted)
    vocab = sorted({w for t in base[:500] for w in t.split()})
    docs = [Document(f"b{i}", t) for i, t in enumerate(base)]
    planted = []
    for i, src in enumerate(rng.sample(range(len(base)), n_planted)):
        target = TARGETS[i % len(TARGETS)]
        text, j = plant(base[src], target, vocab, rng)
        docs.append(Document(f"p{i}", text))
        planted.append((f"b{src}", f"p{i}", target, j))
    rng.shuffle(docs)
    return docs, planted


def neighbours(docs: list[Document], floor: float = 0.3) -> list[dict[int, float]]:
    """For each document, the exact Jaccard with every document sharing a shingle, if >= floor."""
    sets = [shingles(d.text) for d in docs]
    index: dict[bytes, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for sh in s:
            index[sh].append(i)
    out: list[dict[int, float]] = [dict() for _ in docs]
    for i, s in enumerate(sets):
        shared = Counter(j for sh in s for j in index[sh] if j > i)
        for j, c in shared.items():
            jac = c / (len(s) + len(sets[j]) - c)
            if jac >= floor:
                out[i][j] = out[j][i] = jac
    return out


def score(docs, kept_ids: set[str], nb) -> tuple[float, float, int]:
    kept = [d.id in kept_ids for d in docs]
    removed = [i for i, k in enumerate(kept) if not k]
    tp = sum(any(kept[j] and jac >= THRESHOLD for j, jac in nb[i].items()) for i in removed)
    should = [i for i in range(len(docs)) if any(j < i and jac >= THRESHOLD for j, jac in nb[i].items())]
    found = sum(not kept[i] for i in should)
    return (tp / len(removed) if removed else 1.0), (found / len(should) if should else 1.0), len(removed)


def run_lmforge(docs, cfg: DedupConfig) -> tuple[set[str], float]:
    t0 = time.perf_counter()
    kept, _ = dedup_documents(docs, cfg)
    return {d.id for d in kept}, time.perf_counter() - t0


def run_datasketch(docs) -> tuple[set[str], float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    kept = set()
    for d in docs:
        words = d.text.lower().split()
        m = MinHash(num_perm=128)
        for sh in {" ".join(words[i:i + NGRAM]) for i in range(max(len(words) - NGRAM + 1, 1))}:
            m.update(sh.encode("utf-8"))
        if not lsh.query(m):
            kept.add(d.id)
        lsh.insert(d.id, m)
    return kept, time.perf_counter() - t0


def run_datatrove(docs, hash_fc: str | None) -> tuple[set[str], float]:
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
    dt_docs = [DTDocument(text=d.text, id=d.id) for d in docs]
    kept: set[str] = set()

    def collect(data, rank=0, world_size=1):
        for doc in data:
            kept.add(doc.id)
            yield doc

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, stderr_to(Path(os.devnull)):
        stages = [[lambda data, rank=0, world_size=1: iter(dt_docs),
                   MinhashDedupSignature(f"{tmp}/sig", config=cfg, language=Whitespace())],
                  [MinhashDedupBuckets(f"{tmp}/sig", f"{tmp}/buckets", config=cfg)],
                  [MinhashDedupCluster(f"{tmp}/buckets", f"{tmp}/remove", config=cfg)],
                  [lambda data, rank=0, world_size=1: iter(dt_docs), MinhashDedupFilter(f"{tmp}/remove"), collect]]
        for i, pipeline in enumerate(stages):
            tasks = cfg.num_buckets if i == 1 else 1
            LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{tmp}/logs{i}").run()
    return kept, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="documents in the corpus (30%% planted)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-datatrove", action="store_true", help="skip datatrove's MinHash stages")
    args = ap.parse_args()

    t0 = time.perf_counter()
    docs, planted = build_corpus(args.n, args.seed)
    nb = neighbours(docs)
    print(f"corpus: {len(docs):,} documents ({len(planted):,} planted), built and scored in "
          f"{time.perf_counter() - t0:.1f} s")

    results = {}
    results["lmforge (14x8, verified >= 0.8)"] = run_lmforge(docs, DedupConfig())
    results["lmforge (14x8, unverified: FineWeb)"] = run_lmforge(docs, DedupConfig(threshold=None))
    results["datasketch recipe (128 perm, LSH 0.8)"] = run_datasketch(docs)
    notes = []
    if args.no_datatrove:
        pass
    elif importlib.util.find_spec("datatrove") is None:
        notes.append("datatrove is not installed (pip install datatrove): not measured")
    else:
        for hash_fc in (None, "sha1"):
            try:
                results[f"datatrove 0.10 MinHash ({hash_fc or 'default xxhash'})"] = run_datatrove(docs, hash_fc)
                break
            except Exception as e:   # report and move on: the peer failing is a result
                notes.append(f"datatrove with {hash_fc or 'its default xxhash'} failed: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    peer = len(docs) / results["datasketch recipe (128 perm, LSH 0.8)"][1]
    print("\n| method | docs | removed | docs/s | precision | recall | ratio (docs/s vs datasketch) |")
    print("|---|---|---|---|---|---|---|")
    for name, (kept, secs) in results.items():
        p, r, removed = score(docs, kept, nb)
        rate = len(docs) / secs
        print(f"| {name} | {len(docs):,} | {removed:,} | {rate:,.0f} | {p:.3f} | {r:.3f} | {rate / peer:.1f}x |")

    print("\nplanted pairs removed, by target Jaccard (true Jaccard: mean [min, max]):")
    print("| target | pairs | true J | " + " | ".join(results) + " |")
    print("|---|---|---|" + "---|" * len(results))
    for target in TARGETS:
        rows = [p for p in planted if p[2] == target]
        js = [p[3] for p in rows]
        cells = []
        for kept, _ in results.values():
            cells.append(f"{sum(p[0] not in kept or p[1] not in kept for p in rows) / len(rows):.3f}")
        print(f"| {target} | {len(rows)} | {sum(js) / len(js):.3f} [{min(js):.3f}, {max(js):.3f}] | "
              + " | ".join(cells) + " |")
    for note in notes:
        print(f"\nnote: {note}")


if __name__ == "__main__":
    main()
