"""Read documents from files, directories, globs and HF datasets, counting everything skipped.

Accepted: .txt .md .rst .py (a whole file is one document), .html .htm (raw HTML, `meta.format`
"html", for the extract step), .jsonl / .json (records with a text field; `id`, `url`, `source`,
`meta` kept when present), .parquet (a text column), WARC/WET (.warc, .wet), each optionally
compressed (.gz, .zst, .bz2); directories are walked recursively in sorted order (the output
directory of `lmforge data run` reads as its shards); `hf:NAME[:SPLIT]`
or a `save_to_disk` directory reads an HF dataset. Every document gets a stable id (the record's
own, else `file:location`), its `source` file and its `url` where known.

Bad input never stops a run: undecodable or binary files, truncated compressed files, malformed
JSON lines, missing text fields and enormous lines are counted by reason in a `ReadReport`, with
their path and line.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.base import Document, Skips

TEXT_FORMATS = (".txt", ".md", ".rst", ".py")
FORMATS = (*TEXT_FORMATS, ".html", ".htm", ".jsonl", ".json", ".parquet", ".warc", ".wet")
COMPRESSIONS = (".gz", ".zst", ".bz2")
MAX_LINE_BYTES = 64 * 1024 * 1024  # a JSONL line or text file above this is skipped, not loaded


@dataclass
class ReadReport:
    """Counts of documents read and records skipped, by reason, with the first few locations."""

    n_docs: int = 0
    skips: Skips = field(default_factory=Skips)

    @property
    def skipped(self) -> Counter:
        return self.skips.counts

    @property
    def examples(self) -> list[str]:
        """The kept locations as "where: reason", in the order they were met."""
        return [f"{where}: {reason}" for reason, where in self.skips.in_order()]

    def skip(self, reason: str, where: str) -> None:
        """Count one skipped record; the first few locations of each reason are kept."""
        self.skips.add(reason, where)

    def merge(self, other: "ReadReport", max_examples: int = 10) -> None:
        """Add another shard's report; its locations are kept while there are fewer than `max_examples` in all."""
        self.n_docs += other.n_docs
        self.skips.counts.update(other.skips.counts)
        for reason, where in other.skips.in_order()[: max(0, max_examples - len(self.skips.order))]:
            self.skips.keep(reason, where)

    def to_dict(self) -> dict:
        return {"n_docs": self.n_docs, "skipped": dict(self.skipped), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> "ReadReport":
        report = cls(n_docs=d["n_docs"])
        report.skips.counts.update(d["skipped"])
        for line in d["examples"]:
            where, reason = line.rsplit(": ", 1)  # a reason is one snake_case word
            report.skips.keep(reason, where)
        return report


def split_suffix(path: Path) -> tuple[str | None, str | None]:
    """(format, compression) from the file name, e.g. 'a.jsonl.gz' -> ('.jsonl', '.gz')."""
    name = path.name.lower()
    comp = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if comp:
        name = name[: -len(comp)]
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    return fmt, comp


def is_hf_dataset(spec: str | Path) -> bool:
    p = Path(spec)
    return str(spec).startswith("hf:") or (p.is_dir() and (p / "dataset_info.json").is_file()
                                          and (p / "state.json").is_file())


def list_inputs(paths: str | Path | Iterable[str | Path], report: ReadReport) -> list[Path | str]:
    """Expand files, directories and globs into input files (and HF dataset specs), in order.

    Files of other types found inside directories are counted as skipped; named explicitly, they are an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path | str] = []
    for spec in paths:
        if is_hf_dataset(spec):
            out.append(str(spec))
            continue
        p = Path(spec)
        if any(ch in str(spec) for ch in "*?[") and not p.exists():
            matches = sorted(glob.glob(str(spec), recursive=True))
            if not matches:
                raise FileNotFoundError(f"input not found: no file matches {spec}")
            out += list_inputs(matches, report)
        elif not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        elif p.is_dir() and (p / "_markers").is_dir():  # an `lmforge data run` output: its shards only
            out += sorted(p.glob("shard-*"))
        elif p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                if split_suffix(f)[0]:
                    out.append(f)
                else:
                    report.skip("unsupported_file", str(f))
        elif split_suffix(p)[0]:
            out.append(p)
        else:
            raise ValueError(f"{p}: unsupported file type; accepted: {', '.join(FORMATS)} "
                             f"(optionally {', '.join(COMPRESSIONS)}), a directory, a glob or hf:NAME")
    return out


def open_binary(path: Path, comp: str | None) -> io.BufferedIOBase:
    if comp == ".gz":
        return gzip.open(path, "rb")
    if comp == ".bz2":
        return bz2.open(path, "rb")
    if comp == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _record_to_doc(record, where: str, source: str, text_field: str, report: ReadReport) -> Document | None:
    if isinstance(record, str):
        record = {text_field: record}
    if not isinstance(record, dict):
        report.skip("not_an_object", where)
        return None
    text = record.get(text_field)
    reason = ("missing_text" if text is None else "non_string_text" if not isinstance(text, str)
              else "empty_text" if not text.strip() else None)
    if reason:
        report.skip(reason, where)
        return None
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    rid = record.get("id")
    return Document(id=str(rid) if rid not in (None, "") else where, text=text, url=record.get("url"),
                    source=record.get("source") or source, meta=meta)


def _read_text_file(raw: bytes, where: str, report: ReadReport) -> str | None:
    if not raw.strip():
        report.skip("empty_file", where)
        return None
    if b"\x00" in raw[:8192]:
        report.skip("binary_file", where)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        report.skip("undecodable", where)
        return None


def _file_documents(path: Path, text_field: str, report: ReadReport) -> Iterator[Document]:
    fmt, comp = split_suffix(path)
    src = str(path)
    if fmt in (".warc", ".wet"):
        from lmforge.data.warc import iter_warc_documents

        yield from iter_warc_documents(path, report)
        return
    if fmt == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            report.skip("missing_text_column", f"{path} (columns: {', '.join(pf.schema_arrow.names)})")
            return
        row = 0
        for batch in pf.iter_batches():
            for record in batch.to_pylist():
                doc = _record_to_doc(record, f"{src}:row {row}", src, text_field, report)
                row += 1
                if doc:
                    yield doc
        return
    try:
        with open_binary(path, comp) as f:
            if fmt == ".jsonl":
                lineno = 0
                while True:
                    line = f.readline(MAX_LINE_BYTES + 1)
                    if not line:
                        break
                    lineno += 1
                    if len(line) > MAX_LINE_BYTES:
                        report.skip("line_too_long", f"{src}:{lineno}")
                        while line and not line.endswith(b"\n"):  # skip the rest of the line
                            line = f.readline(MAX_LINE_BYTES)
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except ValueError:
                        report.skip("invalid_json", f"{src}:{lineno}")
                        continue
                    doc = _record_to_doc(record, f"{src}:{lineno}", src, text_field, report)
                    if doc:
                        yield doc
                return
            raw = f.read(MAX_LINE_BYTES + 1)
    except (EOFError, OSError, gzip.BadGzipFile) as e:  # truncated or corrupt compressed stream
        report.skip("truncated_or_corrupt", f"{src}: {type(e).__name__}")
        return
    except Exception as e:  # noqa: BLE001 - zstd/bz2 raise their own error types for corrupt input
        report.skip("truncated_or_corrupt", f"{src}: {type(e).__name__}")
        return
    if len(raw) > MAX_LINE_BYTES:
        report.skip("file_too_large", src)
        return
    if fmt == ".json":
        try:
            records = json.loads(raw)
        except ValueError:
            report.skip("invalid_json", src)
            return
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            report.skip("not_a_list", src)
            return
        for i, record in enumerate(records):
            doc = _record_to_doc(record, f"{src}:item {i}", src, text_field, report)
            if doc:
                yield doc
        return
    text = _read_text_file(raw, src, report)
    if text is None:
        return
    meta = {"format": "html"} if fmt in (".html", ".htm") else {}
    yield Document(id=src, text=text, source=src, meta=meta)


def open_hf_dataset(spec: str):
    """`hf:NAME[:SPLIT]` (hub id, online only) or a `save_to_disk` directory, as one split (default train)."""
    import datasets

    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        return datasets.load_dataset(name, split=split or "train")
    ds = datasets.load_from_disk(spec)
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def _hf_documents(spec: str, text_field: str, report: ReadReport) -> Iterator[Document]:
    """The documents of an HF dataset (see `open_hf_dataset`)."""
    for i, record in enumerate(open_hf_dataset(spec)):
        doc = _record_to_doc(record, f"{spec}:row {i}", spec, text_field, report)
        if doc:
            yield doc


def iter_documents(paths: str | Path | Iterable[str | Path], text_field: str = "text",
                   report: ReadReport | None = None) -> Iterator[Document]:
    """Yield every document of `paths`, counting skipped records in `report`.

    Paths are checked now, so a missing input fails at the call rather than midway through a run.
    """
    report = report if report is not None else ReadReport()
    inputs = list_inputs(paths, report)

    def docs() -> Iterator[Document]:
        for item in inputs:
            it = (_hf_documents(item, text_field, report) if isinstance(item, str)
                  else _file_documents(item, text_field, report))
            for doc in it:
                report.n_docs += 1
                yield doc

    return docs()


def iter_texts(paths: str | Path | Iterable[str | Path], text_field: str = "text",
               report: ReadReport | None = None) -> Iterator[str]:
    """Only the texts (tokenizer training and token shards)."""
    return (doc.text for doc in iter_documents(paths, text_field, report))
