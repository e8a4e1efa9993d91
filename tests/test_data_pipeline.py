"""Readers and the pipeline engine: every input format, bad input counted, sharding, resume, report."""
from __future__ import annotations

import bz2
import gzip
import json
from pathlib import Path

import pytest

from conftest import require, run_cli
from lmforge.data.pipeline import PipelineConfig, plan_shards, read_stage, run_pipeline
from lmforge.data.readers import ReadReport, iter_documents


def write_jsonl(path: Path, records: list) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))


def make_corpus(d: Path, files: int = 4, per_file: int = 30) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        write_jsonl(d / f"part{f}.jsonl", [{"text": f"document {f}-{i}: " + "words " * 20, "url": f"http://x/{f}/{i}"}
                                           for i in range(per_file)])
    return d


def all_docs(out: Path) -> list[dict]:
    return [json.loads(d.to_json()) for p in sorted(out.glob("shard-*.jsonl.gz")) for d in read_stage(p)]


def test_every_format_is_read_with_ids_sources_and_urls(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.html").write_text("<html><body><p>Hello</p></body></html>")
    write_jsonl(tmp_path / "c.jsonl", [{"id": "own-id", "text": "with id", "url": "http://u", "meta": {"k": 1}},
                                      {"text": "no id"}])
    (tmp_path / "d.json").write_text(json.dumps(["string record", {"text": "object record"}]))
    pq.write_table(pa.table({"text": ["pq row"]}), tmp_path / "e.parquet")
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(b'{"text": "gz"}\n'))
    (tmp_path / "g.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "zst"}\n'))
    (tmp_path / "h.txt.bz2").write_bytes(bz2.compress(b"bz2 text"))
    docs = {d.text: d for d in iter_documents(tmp_path)}
    assert set(docs) == {"plain text file", "<html><body><p>Hello</p></body></html>", "with id", "no id",
                         "string record", "object record", "pq row", "gz", "zst", "bz2 text"}
    assert docs["with id"].id == "own-id" and docs["with id"].url == "http://u" and docs["with id"].meta == {"k": 1}
    assert docs["no id"].id == f"{tmp_path / 'c.jsonl'}:2" and docs["no id"].source == str(tmp_path / "c.jsonl")
    assert docs["<html><body><p>Hello</p></body></html>"].meta == {"format": "html"}
    assert [d.id for d in iter_documents(tmp_path)] == [d.id for d in iter_documents(tmp_path)]  # stable
    assert sorted(d.text for d in iter_documents(str(tmp_path / "*.jsonl*"))) == ["gz", "no id", "with id", "zst"]


def test_hf_dataset_directory(tmp_path):
    datasets = require("datasets")
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    assert [d.text for d in iter_documents(tmp_path / "ds")] == ["one", "two"]


def test_bad_input_is_counted_and_named_and_the_rest_is_read(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "empty.md").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    data = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(20000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": "good"}, "{broken", {"txt": "x"}, {"text": 5}, {"text": " "}])
    (tmp_path / "notes.csv").write_text("a,b")
    report = ReadReport()
    texts = [d.text for d in iter_documents(tmp_path, report=report)]
    assert "good" in texts and "line 0" in texts  # a truncated gzip still yields what precedes the cut
    assert report.skipped == {"binary_file": 1, "empty_file": 1, "undecodable": 1, "truncated_or_corrupt": 1,
                              "invalid_json": 1, "missing_text": 1, "non_string_text": 1, "empty_text": 1,
                              "unsupported_file": 1}
    assert any(e.startswith(f"{tmp_path / 'mixed.jsonl'}:2") for e in report.examples)


def test_shards_group_small_files_and_keep_order(tmp_path):
    files = []
    for i, size in enumerate([10, 10, 10, 50, 5]):
        (tmp_path / f"{i}.txt").write_text("x" * size)
        files.append(str(tmp_path / f"{i}.txt"))
    assert plan_shards(files, shard_mb=25e-6) == [files[:2], files[2:3], files[3:4], files[4:]]


def test_pipeline_without_steps_copies_every_document_once(tmp_path):
    corpus = make_corpus(tmp_path / "in")
    (corpus / "bad.jsonl").write_text("{nope\n")
    cfg = PipelineConfig(inputs=[str(corpus)], out_dir=tmp_path / "out", workers=2, shard_mb=0.002)
    report = run_pipeline(cfg)
    docs = all_docs(tmp_path / "out")
    assert len(docs) == 120 and len({d["id"] for d in docs}) == 120
    assert report["docs_out"] == 120 and report["errors"] == {"invalid_json": 1}
    assert (tmp_path / "out" / "report.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["read"]["n_docs"] == 120 and len(saved["outputs"]) == len(list((tmp_path / "out").glob("shard-*")))


def test_resumed_pipeline_equals_an_uninterrupted_one(tmp_path):
    corpus = make_corpus(tmp_path / "in", files=6)
    kw = dict(inputs=[str(corpus)], workers=1, shard_mb=0.002)
    run_pipeline(PipelineConfig(out_dir=tmp_path / "full", **kw))
    out = tmp_path / "part"
    run_pipeline(PipelineConfig(out_dir=out, **kw))
    # A kill after shard 2: later shards' outputs and markers gone, a half-written temp file left behind.
    shards = sorted(out.glob("shard-*.jsonl.gz"))
    for p in shards[3:]:
        p.unlink()
        (out / "_markers" / f"a-{p.name.split('.')[0][6:]}.json").unlink()
    (out / f".{shards[4].name}.tmp-999").write_bytes(b"partial")
    first_done = shards[0].stat().st_mtime_ns
    run_pipeline(PipelineConfig(out_dir=out, **kw))
    assert shards[0].stat().st_mtime_ns == first_done  # finished shards are not redone
    assert all_docs(out) == all_docs(tmp_path / "full")


def test_data_run_cli_prints_the_funnel_and_bad_config_names_the_key(tmp_path):
    corpus = make_corpus(tmp_path / "in", files=2)
    proc = run_cli("data", "run", f"inputs=[{corpus}]", f"out_dir={tmp_path / 'out'}")
    assert "read" in proc.stdout and "documents out: 60" in proc.stdout
    bad = run_cli("data", "run", f"inputs=[{corpus}]", f"out_dir={tmp_path / 'o2'}", "steps=[nosuchstep]",
                  check=False)
    assert bad.returncode == 2 and "unknown step 'nosuchstep'" in bad.stderr
    missing = run_cli("data", "run", f"out_dir={tmp_path / 'o3'}", check=False)
    assert missing.returncode == 2 and "inputs" in missing.stderr


def dup_corpus(d: Path, files: int = 4) -> Path:
    """Documents with exact and near duplicates spread over several files, and some PII."""
    import random
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [" ".join(rng.choice(vocab) for _ in range(120)) for _ in range(40)]
    d.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        records = []
        for i in range(25):
            j = (f * 25 + i) % 40  # documents 0..39 appear once or more across files: exact duplicates
            text = base[j]
            if f % 2 == 1 and i % 3 == 0:  # a near duplicate of an even file's copy: two words changed
                words = text.split()
                words[3], words[60] = "changed", "edited"
                text = " ".join(words)
            records.append({"text": f"{text} contact me at person{j}@example.com", "id": f"f{f}-{i}"})
        write_jsonl(d / f"part{f}.jsonl", records)
    return d


@pytest.mark.parametrize("executor, workers", [("local", 1), ("local", 2), ("ray", 2)])
def test_dedup_and_pii_pipeline_is_the_same_on_every_executor(tmp_path, executor, workers):
    if executor == "ray":
        require("ray", why="the ray extra (in dev)")
    corpus = dup_corpus(tmp_path / "in")
    cfg = PipelineConfig(inputs=[str(corpus)], out_dir=tmp_path / "out", workers=workers, executor=executor,
                         shard_mb=0.001, steps=[{"dedup": {}}, "pii"])
    report = run_pipeline(cfg)
    docs = all_docs(tmp_path / "out")
    texts = [d["text"] for d in docs]
    assert len(texts) == len(set(texts)) and len(texts) <= 40 + 8  # exact dups gone; near dups mostly gone
    assert all("[EMAIL]" in t and "@example.com" not in t for t in texts)
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["dedup"]["drops"]["exact_duplicate"] > 0 and steps["dedup"]["drops"]["near_duplicate"] > 0
    assert steps["pii"]["counters"]["pii_email"] == len(texts)
    reference = tmp_path.parent / "dedup_reference.json"
    ids = sorted(d["id"] for d in docs)
    if executor == "local" and workers == 1:
        reference.write_text(json.dumps(ids))
    elif reference.exists():
        assert ids == json.loads(reference.read_text())


def test_sigkilled_pipeline_restarted_gives_identical_output(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT
    corpus = dup_corpus(tmp_path / "in", files=24)
    args = [f"inputs=[{corpus}]", "shard_mb=0.001", "steps=[{dedup: {}}, pii]", "workers=1"]
    run_cli("data", "run", *args, f"out_dir={tmp_path / 'full'}")
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "data", "run", *args, f"out_dir={out}"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list((out / "_markers").glob("a-*.json"))) < 3:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists(), "the run finished before the kill; make the corpus larger"
    run_cli("data", "run", *args, f"out_dir={out}")
    assert all_docs(out) == all_docs(tmp_path / "full")


def test_html_directory_to_tokenizer_and_shards(tmp_path):
    """Real HTML pages (pydoc's pages for stdlib modules) -> data run -> tokenizer train -> tokenize."""
    import importlib
    import pydoc

    pages = tmp_path / "html"
    pages.mkdir()
    for name in ["json", "csv", "argparse", "textwrap", "shutil", "string", "heapq", "bisect"]:
        module = importlib.import_module(name)
        html = pydoc.HTMLDoc()
        (pages / f"{name}.html").write_text(html.page(f"Python: module {name}", html.docmodule(module)))
    (pages / "broken.html.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    proc = run_cli("data", "run", f"inputs=[{pages}]", f"out_dir={tmp_path / 'clean'}", "workers=2",
                   "steps=[extract, {gopher_repetition: {}}, {dedup: {}}, pii]")
    assert "extract" in proc.stdout and "dedup" in proc.stdout and "truncated_or_corrupt 1" in proc.stdout
    report = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert report["steps"][0]["name"] == "extract" and report["steps"][0]["docs_out"] >= 6
    docs = all_docs(tmp_path / "clean")
    assert docs and all("<html" not in d["text"] and "<td" not in d["text"] for d in docs)
    run_cli("tokenizer", "train", str(tmp_path / "clean"), "--vocab-size", "500", "--out", str(tmp_path / "tok"))
    out = run_cli("tokenize", str(tmp_path / "clean"), "--tokenizer", str(tmp_path / "tok"), "--out",
                  str(tmp_path / "tokens"), "--val-fraction", "0.2")
    assert "skipped" not in out.stdout  # the run's own report and stage files are not read as documents
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["n_docs"]["train"] + meta["n_docs"]["val"] == len(docs)


def test_dedup_and_pii_commands_alone(tmp_path):
    corpus = dup_corpus(tmp_path / "in", files=2)
    merged = tmp_path / "all.jsonl"
    merged.write_text((corpus / "part0.jsonl").read_text() + (corpus / "part1.jsonl").read_text())
    proc = run_cli("data", "dedup", str(merged), str(tmp_path / "dedup.jsonl"))
    assert "exact_duplicate" in proc.stdout and "near_duplicate" in proc.stdout
    kept = [json.loads(line) for line in (tmp_path / "dedup.jsonl").read_text().splitlines()]
    assert len({d["text"] for d in kept}) == len(kept) < 50
    run_cli("data", "pii", str(tmp_path / "dedup.jsonl"), str(tmp_path / "pii.parquet"))
    import pyarrow.parquet as pq
    texts = pq.read_table(tmp_path / "pii.parquet").column("text").to_pylist()
    assert len(texts) == len(kept) and all("[EMAIL]" in t for t in texts)


def test_a_different_run_into_the_same_out_dir_is_refused(tmp_path):
    corpus = make_corpus(tmp_path / "in", files=2)
    run_pipeline(PipelineConfig(inputs=[str(corpus)], out_dir=tmp_path / "out"))
    with pytest.raises(ValueError, match="holds a run with other inputs or steps"):
        run_pipeline(PipelineConfig(inputs=[str(corpus)], out_dir=tmp_path / "out", steps=["pii"]))


def test_enormous_lines_are_skipped_without_loading_them(tmp_path, monkeypatch):
    import lmforge.data.readers as readers
    monkeypatch.setattr(readers, "MAX_LINE_BYTES", 1000)
    write_jsonl(tmp_path / "a.jsonl", [{"text": "short"}, {"text": "x" * 5000}, {"text": "after"}])
    (tmp_path / "big.txt").write_text("y" * 5000)
    report = ReadReport()
    assert [d.text for d in iter_documents(tmp_path, report=report)] == ["short", "after"]
    assert report.skipped == {"line_too_long": 1, "file_too_large": 1}
    assert report.examples[0] == f"{tmp_path / 'a.jsonl'}:2: line_too_long"


def test_step_time_excludes_the_steps_before_it(monkeypatch):
    """Each step's seconds are its own: the slow step's time is not charged to the step after it.

    A fake clock that only the slow step advances makes this exact; how fast steps run is bench/pipeline.py's."""
    import types

    import lmforge.data.base as base
    from lmforge.data.base import Document, MapStep, StepStats, counted

    clock = [0.0]
    monkeypatch.setattr(base, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def slow(doc, stats):
        clock[0] += 1.0
        return doc

    docs = [Document(id=str(i), text="x") for i in range(20)]
    a, b = StepStats("slow"), StepStats("fast")
    out = list(counted(MapStep("fast", lambda d, s: d), counted(MapStep("slow", slow), docs, a), b))
    assert len(out) == 20 and a.seconds == 20.0 and b.seconds == 0.0


def test_data_commands_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys\nfrom lmforge.data.pipeline import build_step\n"
            "for n in ['extract', 'pii', 'heuristic', 'gopher_quality', 'gopher_repetition', 'c4', 'fineweb']:\n"
            "    build_step(n, {})\n"
            "import lmforge.data.crawl, lmforge.data.dedup\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
