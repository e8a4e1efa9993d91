"""The data pipeline's one interface: documents flow through steps, each step counts what it did.

A step is a callable `step(docs, stats) -> docs` over an iterator of `Document`s (datatrove's
shape). Filters are plain predicates wrapped by `filter_step`; transforms by `map_step`. Every
dropped document is counted under a reason, with a few examples, in the step's `StepStats`.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Protocol

MAX_EXAMPLES = 3  # examples kept per drop reason / error kind


@dataclass
class Document:
    """One record of the DESIGN.md document format."""

    id: str
    text: str
    url: str | None = None
    source: str | None = None
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, {})}, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Document":
        return cls(id=str(d["id"]), text=d["text"], url=d.get("url"), source=d.get("source"), meta=d.get("meta") or {})


@dataclass
class StepStats:
    """What one step did: documents and bytes in and out, time, drop reasons with examples, errors."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    drops: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> [doc id or "path:line", ...]
    counters: Counter = field(default_factory=Counter)  # step-specific counts (e.g. PII replacements)

    def drop(self, reason: str, where: str) -> None:
        self.drops[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < MAX_EXAMPLES:
            ex.append(where)

    def merge(self, other: "StepStats") -> None:
        """Add another shard's stats for the same step."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.drops.update(other.drops)
        self.counters.update(other.counters)
        for reason, ex in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(ex[: MAX_EXAMPLES - len(mine)])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["drops"], d["counters"] = dict(self.drops), dict(self.counters)
        d["docs_per_sec"] = self.docs_in / self.seconds if self.seconds > 0 else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "StepStats":
        d = {k: v for k, v in d.items() if k != "docs_per_sec"}
        return cls(**{**d, "drops": Counter(d.get("drops", {})), "counters": Counter(d.get("counters", {}))})


class Step(Protocol):
    name: str

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]: ...


def counted(step: Step, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
    """Run `step` while counting docs/bytes in and out and the time spent inside this step alone.

    Steps are chained generators: pulling a document through this step also runs the steps before
    it, so the time spent waiting on upstream documents is measured and subtracted.
    """
    upstream = 0.0

    def inputs():
        nonlocal upstream
        source = iter(docs)
        while True:
            t0 = time.perf_counter()
            try:
                doc = next(source)
            except StopIteration:
                upstream += time.perf_counter() - t0
                return
            upstream += time.perf_counter() - t0
            stats.docs_in += 1
            stats.bytes_in += len(doc.text.encode("utf-8", "replace"))
            yield doc

    it = iter(step(inputs(), stats))
    while True:
        t0, up0 = time.perf_counter(), upstream
        try:
            doc = next(it)
        except StopIteration:
            stats.seconds += time.perf_counter() - t0 - (upstream - up0)
            return
        stats.seconds += time.perf_counter() - t0 - (upstream - up0)
        stats.docs_out += 1
        stats.bytes_out += len(doc.text.encode("utf-8", "replace"))
        yield doc


@dataclass
class FilterStep:
    """Keep a document unless `reject(doc)` returns a reason (a short snake_case string)."""

    name: str
    reject: Callable[[Document], str | None]

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            reason = self.reject(doc)
            if reason is None:
                yield doc
            else:
                stats.drop(reason, doc.id)


@dataclass
class MapStep:
    """Replace each document by `fn(doc, stats)`; returning None drops it (the fn records why)."""

    name: str
    fn: Callable[[Document, StepStats], Document | None]

    def __call__(self, docs: Iterable[Document], stats: StepStats) -> Iterator[Document]:
        for doc in docs:
            out = self.fn(doc, stats)
            if out is not None:
                yield out
