"""The data pipeline's one interface: documents flow through steps, each step counts what it did.

A step is a callable `step(docs, stats) -> docs` over an iterator of `Document`s (datatrove's
shape). Filters are plain predicates wrapped by `filter_step`; transforms by `map_step`. Every
dropped document is counted under a reason, with a few examples, in the step's `StepStats`.
Readers (`readers.ReadReport`) and the crawler (`crawl_state.CrawlReport`) count what they skip
with the same `Skips`.
"""
from __future__ import annotations

import copy
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
class Skips:
    """Items skipped or dropped, counted by reason, with the first few locations of each reason.

    `order` holds the reason of each kept location in the order they were met, so a report can list
    the locations as they happened (`in_order`) as well as by reason (`examples`).
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> [location, ...], at most MAX_EXAMPLES each
    order: list = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        """Count one item under `reason`; its location is kept while the reason has fewer than MAX_EXAMPLES."""
        self.counts[reason] += 1
        if len(self.examples.get(reason, ())) < MAX_EXAMPLES:
            self.keep(reason, where)

    def keep(self, reason: str, where: str) -> None:
        """Keep a location of `reason` without counting it (its count comes with it from another report)."""
        self.examples.setdefault(reason, []).append(where)
        self.order.append(reason)

    def merge(self, other: "Skips") -> None:
        """Add another part's counts; its locations fill each reason up to MAX_EXAMPLES."""
        self.counts.update(other.counts)
        for reason, where in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            taken = where[: MAX_EXAMPLES - len(mine)]
            mine.extend(taken)
            self.order += [reason] * len(taken)

    def in_order(self) -> list[tuple[str, str]]:
        """The kept (reason, location) pairs, in the order they were met."""
        seen: Counter = Counter()
        out = []
        for reason in self.order:
            out.append((reason, self.examples[reason][seen[reason]]))
            seen[reason] += 1
        return out


@dataclass
class StepStats:
    """What one step did: documents and bytes in and out, time, drop reasons with examples, errors."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    skips: Skips = field(default_factory=Skips)  # drops by reason, with doc ids or "path:line"
    counters: Counter = field(default_factory=Counter)  # step-specific counts (e.g. PII replacements)

    @property
    def drops(self) -> Counter:
        return self.skips.counts

    @property
    def examples(self) -> dict:
        return self.skips.examples

    def drop(self, reason: str, where: str) -> None:
        self.skips.add(reason, where)

    def merge(self, other: "StepStats") -> None:
        """Add another shard's stats for the same step."""
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.skips.merge(other.skips)
        self.counters.update(other.counters)

    def to_dict(self) -> dict:
        return {"name": self.name, "docs_in": self.docs_in, "docs_out": self.docs_out, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "seconds": self.seconds, "drops": dict(self.drops),
                "examples": copy.deepcopy(self.examples), "counters": dict(self.counters),
                "docs_per_sec": self.docs_in / self.seconds if self.seconds > 0 else None}

    @classmethod
    def from_dict(cls, d: dict) -> "StepStats":
        examples = copy.deepcopy(d.get("examples", {}))
        skips = Skips(Counter(d.get("drops", {})), examples, [r for r, where in examples.items() for _ in where])
        numbers = {k: d[k] for k in ("docs_in", "docs_out", "bytes_in", "bytes_out", "seconds") if k in d}
        return cls(d["name"], **numbers, skips=skips, counters=Counter(d.get("counters", {})))


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
