"""Read documents from files, directories, globs and HF datasets, counting everything skipped.

Accepted: .txt .md .rst .py (a whole file is one document), .html .htm (raw HTML, `meta.format`
"html", for the extract step), .jsonl / .json (records with a text field; `id`, `url`, `source`,
`meta` kept when present), .parquet (a text column), WARC/WET (.warc, .wet), each optionally
compressed (.gz, .zst, .bz2); directories are walked recursively in sorted order (the output
directory of `lmforge data run` reads as its shards); `hf:NAME[:SPLIT]`
or a `save_to_disk` directory reads an HF dataset. Every document gets a stable id (the record's
own, else `file:location`), its `source` file and its `url` where known.

Two levels: `iter_records` yields the raw records of the record formats with their location
(`path:line`, `path:item i`, `path:row i`), which is what the SFT loader reads; `iter_documents`
turns records, text files and WARC records into `Document`s.

Bad input never stops a run: undecodable or binary files, truncated compressed files, malformed
JSON lines, missing text fields and enormous lines are counted by reason in a `ReadReport`, with
their path and line."""

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
from lmforge.errors import UserError

TEXT_FORMATS = (".txt", ".md", ".rst", ".py")
RECORD_FORMATS = (".jsonl", ".json", ".parquet")
FORMATS = (*TEXT_FORMATS, ".html", ".htm", *RECORD_FORMATS, ".warc", ".wet")
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
            raise UserError(f"{p}: unsupported file type; accepted: {', '.join(FORMATS)} "
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


def _read_whole(path: Path, comp: str | None, report: ReadReport) -> bytes | None:
    """A whole (decompressed) file, or None when it is unreadable or larger than MAX_LINE_BYTES (counted)."""
    try:
        with open_binary(path, comp) as f:
            raw = f.read(MAX_LINE_BYTES + 1)
    except Exception as e:  # noqa: BLE001 - gzip, bz2 and zstd raise their own error types for corrupt input
        report.skip("truncated_or_corrupt", f"{path}: {type(e).__name__}")
        return None
    if len(raw) > MAX_LINE_BYTES:
        report.skip("file_too_large", str(path))
        return None
    return raw


# ---- records: JSON lines, JSON, Parquet and HF dataset rows, with their location ------------------

def _line_records(path: Path, comp: str | None, report: ReadReport) -> Iterator[tuple[str, object]]:
    """One record per JSON line, streamed; blank lines are passed over, long and malformed ones counted."""
    src = str(path)
    with open_binary(path, comp) as f:
        lineno = 0
        while line := f.readline(MAX_LINE_BYTES + 1):
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
            yield f"{src}:{lineno}", record


def _json_records(path: Path, comp: str | None, report: ReadReport,
                  locate_line: bool) -> Iterator[tuple[str, object]]:
    """The records of a file holding one JSON value, read whole: an array of records, or one record."""
    src = str(path)
    raw = _read_whole(path, comp, report)
    if raw is None:
        return
    try:
        records = json.loads(raw)
    except ValueError as e:
        report.skip("invalid_json", f"{src}:{getattr(e, 'lineno', '?')}" if locate_line else src)
        return
    if isinstance(records, dict):
        records = [records]
    if not isinstance(records, list):
        report.skip("not_a_list", src)
        return
    for i, record in enumerate(records):
        yield f"{src}:item {i}", record


def _parquet_records(path: Path, report: ReadReport, text_column: str | None) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_column is not None and text_column not in pf.schema_arrow.names:
        report.skip("missing_text_column", f"{path} (columns: {', '.join(pf.schema_arrow.names)})")
        return
    row = 0
    for batch in pf.iter_batches():
        for record in batch.to_pylist():
            yield f"{path}:row {row}", record
            row += 1


def _starts_array(path: Path, comp: str | None) -> bool:
    """Whether the (decompressed) file's first non-whitespace byte opens a JSON array."""
    with open_binary(path, comp) as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return chunk.lstrip()[:1] == b"["
    return False


def file_records(path: Path, report: ReadReport, text_column: str | None = None,
                 json_lines: bool = False) -> Iterator[tuple[str, object]]:
    """(location, record) for each record of one .jsonl, .json or .parquet file (optionally compressed).

    JSON lines and Parquet are streamed; a .json file is one value read whole (up to MAX_LINE_BYTES):
    an array of records, or one record. With `json_lines` (the SFT loader's rule) a .json file that
    is not an array is read as JSON lines, and a broken array is located by its line. A Parquet file
    without `text_column` is counted as missing_text_column. A file that cannot be read to its end
    yields the records before the damage, then is counted as truncated_or_corrupt.
    """
    fmt, comp = split_suffix(path)
    try:
        if fmt == ".parquet":
            yield from _parquet_records(path, report, text_column)
        elif fmt == ".json" and (not json_lines or _starts_array(path, comp)):
            yield from _json_records(path, comp, report, locate_line=json_lines)
        else:
            yield from _line_records(path, comp, report)
    except Exception as e:  # noqa: BLE001 - gzip, bz2, zstd and pyarrow raise their own types for corrupt input
        report.skip("truncated_or_corrupt", f"{path}: {type(e).__name__}")


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


def hf_records(spec: str) -> Iterator[tuple[str, object]]:
    """(location, record) for each row of an HF dataset (see `open_hf_dataset`)."""
    for i, record in enumerate(open_hf_dataset(spec)):
        yield f"{spec}:row {i}", record


def iter_records(paths: str | Path | Iterable[str | Path], report: ReadReport,
                 json_lines: bool = False) -> Iterator[tuple[str, object]]:
    """(location, record) for each record of `paths`: JSON lines, JSON and Parquet files, HF datasets.

    Other files are counted as unsupported_file; `json_lines` as in `file_records`.
    """
    for item in list_inputs(paths, report):
        if isinstance(item, str):
            yield from hf_records(item)
        elif split_suffix(item)[0] in RECORD_FORMATS:
            yield from file_records(item, report, json_lines=json_lines)
        else:
            report.skip("unsupported_file", str(item))


# ---- documents ------------------------------------------------------------------------------------

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
    elif fmt in RECORD_FORMATS:
        for where, record in file_records(path, report, text_column=text_field):
            if doc := _record_to_doc(record, where, src, text_field, report):
                yield doc
    elif (raw := _read_whole(path, comp, report)) is not None:
        if (text := _read_text_file(raw, src, report)) is not None:
            meta = {"format": "html"} if fmt in (".html", ".htm") else {}
            yield Document(id=src, text=text, source=src, meta=meta)


def _hf_documents(spec: str, text_field: str, report: ReadReport) -> Iterator[Document]:
    """The documents of an HF dataset (see `open_hf_dataset`)."""
    for where, record in hf_records(spec):
        if doc := _record_to_doc(record, where, spec, text_field, report):
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
