"""HTML pipeline: extract -> Gopher quality -> Gopher repetition -> MinHash dedup -> PII, lmforge vs datatrove, one run.

Corpus (bench/_pipeline_corpus.py): N HTML pages made offline, about half pydoc's pages of
standard-library modules (real HTML, code-heavy: Gopher drops nearly all of them), the rest prose
article pages in a site template and 10% planted near-duplicates of articles. Written into a temp
dir twice: as .html files (lmforge's input) and as JSONL shards with the raw HTML in `text`
(datatrove's input). Both tools get the same shards: lmforge's own `plan_shards` groups the .html
files, and each group becomes one JSONL file, read by one datatrove task.

lmforge: `run_pipeline` with `workers` processes and steps extract, gopher_quality,
gopher_repetition, dedup, pii (defaults), timed as a whole (wall, report and plot included).
datatrove 0.10.1: four `LocalPipelineExecutor`s with the same workers, timed as a whole:
JsonlReader -> Trafilatura -> GopherQualityFilter -> GopherRepetitionFilter -> JsonlWriter (kept)
-> MinhashDedupSignature; MinhashDedupBuckets (14 tasks); MinhashDedupCluster (1 task);
JsonlReader (kept) -> MinhashDedupFilter -> PIIFormatter -> JsonlWriter. Workarounds are printed
with the results.

    python bench/pipeline.py [--n 500] [--workers 2] [--shards 4] [--seed 0] [--no-datatrove]
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import tempfile
import time
import traceback
from pathlib import Path

from _bench_util import stderr_to
from _pipeline_corpus import build_pages
from lmforge.data.filters.text import tokens
from lmforge.data.pipeline import PipelineConfig, plan_shards, run_pipeline
from lmforge.data.readers import ReadReport, list_inputs

STEPS = [{"extract": {}}, {"gopher_quality": {}}, {"gopher_repetition": {}}, {"dedup": {}}, {"pii": {}}]
# Extraction settings shared by both tools (trafilatura defaults otherwise); lmforge's are fixed in its extract step.
TRAFILATURA = {"favour_precision": False, "deduplicate": False, "include_tables": True, "timeout": 10}
# datatrove's step names (stats.json) -> lmforge's
DT_STEPS = {"Trafilatura": "extract", "Gopher Quality": "gopher_quality", "Gopher Repetition": "gopher_repetition",
            "MinHash stage 4": "dedup", "PII": "pii"}
NOTES = [
    "datatrove's English word tokenizer is spaCy's (spaCy not installed): its Gopher filters and MinHash get "
    "lmforge's spaCy-like regex tokenizer (words and punctuation tokens) through datatrove's custom "
    "WordTokenizer hook, so both tools see the same words.",
    "datatrove's default MinHash hash (xxhash) fails with xxhash 4.1 ('Strings must be encoded before hashing'): "
    "run with HashConfig(hash_fc='sha1', precision=64); shingles, buckets and hashes per bucket set to lmforge's "
    "defaults (word 3-grams, 20 x 5) instead of datatrove's own (5-grams, 14 x 8).",
    "datatrove's JsonlReader/JsonlWriter need orjson (not a datatrove dependency): pip install orjson.",
    "datatrove's Trafilatura step: favour_precision=False, deduplicate=False, include_tables=True, timeout=10 s "
    "(its defaults: True, True, tables on, 1 s) to match lmforge's extraction settings; lmforge also keeps "
    "the page title and declared language (read from the HTML, not trafilatura's slower metadata pass).",
    "PII: lmforge scrubs emails, IPs, phones, SSNs and credit cards (its default); datatrove's PIIFormatter emails "
    "and IPs only. lmforge's dedup verifies candidate pairs (Jaccard >= 0.8), datatrove's does not.",
]


def write_corpus(pages: list[tuple[str, str]], root: Path, shards: int) -> tuple[Path, Path, float, int]:
    """.html files and the same pages as JSONL shards (lmforge's own shard plan); returns (html, jsonl, shard_mb, k)."""
    html_dir, jsonl_dir = root / "html", root / "jsonl"
    html_dir.mkdir(parents=True)
    jsonl_dir.mkdir()
    by_path = {}
    for i, (name, html) in enumerate(pages):
        path = html_dir / f"{i:05d}.html"
        path.write_text(html, encoding="utf-8")
        by_path[str(path)] = (name, html)
    total_mb = sum(p.stat().st_size for p in html_dir.iterdir()) / 1e6
    sources = [str(s) for s in list_inputs([html_dir], ReadReport())]
    shard_mb = total_mb / shards
    while len(groups := plan_shards(sources, shard_mb)) > shards:  # smallest size that gives `shards` groups
        shard_mb *= 1.01
    for k, group in enumerate(groups):
        with open(jsonl_dir / f"shard-{k:03d}.jsonl", "w", encoding="utf-8") as f:
            for path in group:
                name, html = by_path[path]
                f.write(json.dumps({"id": name, "text": html}) + "\n")
    return html_dir, jsonl_dir, shard_mb, len(groups)


def run_lmforge(html_dir: Path, out: Path, workers: int, shard_mb: float) -> tuple[dict, float]:
    """The whole lmforge pipeline; returns (report, wall seconds)."""
    t0 = time.perf_counter()
    report = run_pipeline(PipelineConfig(inputs=[str(html_dir)], out_dir=out, workers=workers, shard_mb=shard_mb,
                                         steps=STEPS))
    return report, time.perf_counter() - t0


def run_datatrove(jsonl_dir: Path, out: Path, workers: int, tasks: int) -> tuple[dict, int, float]:
    """The same steps in datatrove; returns (docs out per stage, docs out, wall seconds)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                                  MinhashDedupFilter, MinhashDedupSignature)
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Tokens(WordTokenizer):
        """Words and punctuation tokens (spaCy-like), sentences = lines; see NOTES."""

        def word_tokenize(self, text):
            return tokens(text)

        def sent_tokenize(self, text):
            return [s for s in text.splitlines() if s.strip()]

        def span_tokenize(self, text):
            spans, start = [], 0
            for line in text.splitlines(keepends=True):
                spans.append((start, start + len(line)))
                start += len(line)
            return spans

    from lmforge.data.dedup_lsh import DedupConfig

    ours = DedupConfig()  # the same shingles and bands as lmforge's defaults
    tok, cfg = Tokens("en"), MinhashConfig(n_grams=ours.ngram, num_buckets=ours.bands, hashes_per_bucket=ours.rows,
                                           hash_config=HashConfig(hash_fc="sha1", precision=64))
    stages = [
        ([JsonlReader(str(jsonl_dir)), Trafilatura(**TRAFILATURA), GopherQualityFilter(language=tok),
          GopherRepetitionFilter(language=tok), JsonlWriter(f"{out}/kept"),
          MinhashDedupSignature(f"{out}/sigs", config=cfg, language=tok)], tasks, workers),
        ([MinhashDedupBuckets(f"{out}/sigs", f"{out}/buckets", config=cfg)], cfg.num_buckets,
         workers),
        ([MinhashDedupCluster(f"{out}/buckets", f"{out}/remove", config=cfg)], 1, 1),
        ([JsonlReader(f"{out}/kept"), MinhashDedupFilter(f"{out}/remove"), PIIFormatter(), JsonlWriter(f"{out}/out")],
         tasks, workers),
    ]
    t0 = time.perf_counter()
    with stderr_to(out.parent / "datatrove.log"):
        for i, (pipeline, n_tasks, n_workers) in enumerate(stages):
            LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=n_workers, logging_dir=f"{out}/logs{i}").run()
            if i == 0 and len(list(Path(f"{out}/kept").glob("*"))) != tasks:  # the filter stage pairs files by rank
                raise RuntimeError("a datatrove task kept no document: its dedup filter would read the wrong file")
    wall = time.perf_counter() - t0
    counts = {}
    for i in (0, 3):
        for step in json.loads(Path(f"{out}/logs{i}/stats.json").read_text()):
            s = step["stats"]
            ours = next((v for k, v in DT_STEPS.items() if k in step["name"]), None)
            if ours:
                counts[ours] = s.get("forwarded", s.get("total", 0) - s.get("dropped", 0))
    n_out = sum(1 for f in Path(f"{out}/out").glob("*.jsonl.gz") for _ in gzip.open(f, "rt"))
    return counts, n_out, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=500, help="HTML pages")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4, help="input shards (= datatrove tasks), the same for both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-datatrove", action="store_true")
    args = ap.parse_args()

    errors, dt = [], None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        pages, kinds = build_pages(args.n, args.seed)
        html_dir, jsonl_dir, shard_mb, k = write_corpus(pages, root, args.shards)
        mb = sum(len(h.encode()) for _, h in pages) / 1e6
        print(f"corpus: {len(pages)} HTML pages ({', '.join(f'{v} {k_}' for k_, v in kinds.items())}), {mb:.1f} MB, "
              f"{k} shards; built in {time.perf_counter() - t0:.1f} s; {args.workers} workers")
        report, lm_wall = run_lmforge(html_dir, root / "lmforge", args.workers, shard_mb)
        if args.no_datatrove:
            pass
        elif importlib.util.find_spec("datatrove") is None or importlib.util.find_spec("orjson") is None:
            errors.append("datatrove not measured: pip install datatrove orjson")
        else:
            try:
                dt = run_datatrove(jsonl_dir, root / "datatrove", args.workers, k)
            except Exception as e:  # noqa: BLE001 - the peer failing is a result; lmforge's numbers still stand
                log = root / "datatrove.log"
                tail = "\n".join(log.read_text().splitlines()[-15:]) if log.is_file() else ""
                errors.append(f"datatrove failed: {type(e).__name__}: {e}\n{tail}\n{traceback.format_exc(limit=3)}")

    rows = [("lmforge", report["read"]["n_docs"], report["docs_out"], lm_wall)]
    if dt:
        rows.append(("datatrove 0.10.1", len(pages), dt[1], dt[2]))
    print("\n| tool | docs in | docs out | wall s | docs/s | ratio (lmforge / datatrove) |")
    print("|---|---|---|---|---|---|")
    for tool, n_in, n_out, wall in rows:
        ratio = f"{dt[2] / wall:.2f}x" if dt else "-"
        print(f"| {tool} | {n_in:,} | {n_out:,} | {wall:.1f} | {n_in / wall:.1f} | {ratio} |")
    print("\ndocs out after each step, and lmforge's step rate from report.json (docs in / step seconds summed "
          "over shards):\n\n| step | lmforge | datatrove | lmforge docs in | lmforge step s | lmforge step docs/s |")
    print("|---|---|---|---|---|---|")
    for s in report["steps"]:
        theirs = dt[0].get(s["name"], "-") if dt else "-"
        rate = f"{s['docs_in'] / s['seconds']:,.1f}" if s["seconds"] else "-"
        print(f"| {s['name']} | {s['docs_out']:,} | {theirs} | {s['docs_in']:,} | {s['seconds']:.2f} | {rate} |")
    print("\nstep seconds are each step's own time summed over shards (reading excluded); dedup's include its "
          "signatures and clustering.")
    for note in NOTES:
        print(f"\nnote: {note}")
    for err in errors:
        print(f"\n{err}")


if __name__ == "__main__":
    main()
