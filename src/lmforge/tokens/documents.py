"""Read document texts from files and directories for tokenizer training and token shards.

Accepted: .txt, .md, .rst and .py (a whole file is one document), .jsonl / .jsonl.gz (one JSON object per
line), .json (a list of objects or strings), .parquet (a text column). Directories are walked
recursively in sorted order. Bad records are skipped and counted in a `ReadReport`.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Plain-text files (prose and source code) are one document each.
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".jsonl.gz", ".json", ".parquet")
MAX_EXAMPLES = 5


@dataclass
class ReadReport:
    """Counts of documents read and records skipped, by reason, with the first few locations."""

    n_docs: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return {"n_docs": self.n_docs, "skipped": dict(self.skipped), "examples": list(self.examples)}


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def list_files(paths: str | Path | Iterable[str | Path], report: ReadReport) -> list[Path]:
    """Expand files and directories into the list of input files, in order.

    Files of other types found inside directories are counted as skipped; named explicitly, they are an error.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file()):
                if _suffix(f):
                    files.append(f)
                else:
                    report.skip("unsupported_file", str(f))
        elif _suffix(p):
            files.append(p)
        else:
            raise ValueError(f"{p}: unsupported file type; accepted: {', '.join(SUFFIXES)} or a directory")
    return files


def _text_of(record, text_field: str) -> tuple[str | None, str]:
    """The text of one record, or None and the reason it has none."""
    if not isinstance(record, dict):
        return None, "not_an_object"
    text = record.get(text_field)
    if text is None:
        return None, "missing_text"
    if not isinstance(text, str):
        return None, "non_string_text"
    if not text:  # an empty document would only add a lone EOS
        return None, "empty_text"
    return text, ""


def _records(path: Path, text_field: str, report: ReadReport) -> Iterator[tuple[str, object]]:
    """Yield (location, record) for every record of one file; lines that are not JSON are counted here."""
    suffix = _suffix(path)
    if suffix in TEXT_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 ({e})") from None
        yield str(path), {text_field: text}
    elif suffix in (".jsonl", ".jsonl.gz"):
        with (gzip.open if suffix == ".jsonl.gz" else open)(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    report.skip("invalid_json", f"{path}:{lineno}")
                    continue
                yield f"{path}:{lineno}", record
    elif suffix == ".json":
        try:
            records = json.loads(path.read_bytes())
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects or strings, got {type(records).__name__}")
        for i, record in enumerate(records):
            yield f"{path}:item {i}", {text_field: record} if isinstance(record, str) else record
    else:  # .parquet
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: no column {text_field!r}; columns: {', '.join(pf.schema_arrow.names)}")
        row = 0
        for batch in pf.iter_batches(columns=[text_field]):
            for value in batch.column(0).to_pylist():
                yield f"{path}:row {row}", {text_field: value}
                row += 1


def iter_texts(
    paths: str | Path | Iterable[str | Path], text_field: str = "text", report: ReadReport | None = None
) -> Iterator[str]:
    """Yield the text of every document in `paths`, counting skipped records in `report`.

    Paths are checked now, so a missing input fails at the call rather than midway through a run.
    """
    report = report if report is not None else ReadReport()
    files = list_files(paths, report)

    def texts() -> Iterator[str]:
        for path in files:
            for where, record in _records(path, text_field, report):
                text, reason = _text_of(record, text_field)
                if text is None:
                    report.skip(reason, where)
                else:
                    report.n_docs += 1
                    yield text

    return texts()
