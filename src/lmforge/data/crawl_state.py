"""The crawl's report and its durable state: `crawl_report.json` and the event log `crawl_state.jsonl`.

`CrawlState` replays the log on start, so a stopped crawl resumes with its frontier, seen set and
counts (crawl.py's docstring: resume and at-most-once fetching).
"""
from __future__ import annotations

import copy
import json
import os
from collections import Counter, deque
from dataclasses import dataclass, field, fields
from pathlib import Path

from lmforge.data.base import Skips
from lmforge.errors import UserError

SKIP_REASONS = ("robots", "offsite", "non_html", "too_large", "error", "ssrf", "scheme", "depth", "http_status",
                "too_many_redirects", "duplicate", "invalid_url", "extraction_empty", "extraction_timeout",
                "extraction_error", "interrupted")


# ------------------------------------------------------------------------------------------------ report

@dataclass
class CrawlReport:
    """What a crawl did, over all its runs (a resumed crawl keeps counting)."""

    start_url: str
    out_dir: str
    fetched: int = 0          # page URLs requested (each at most once); max_pages bounds this
    documents: int = 0        # documents written to documents.jsonl
    requests: int = 0         # HTTP requests sent: pages, redirect hops and robots.txt
    bytes: int = 0            # body bytes received
    seconds: float = 0.0      # wall time, summed over runs
    runs: int = 0             # 1 + times resumed
    frontier_left: int = 0    # URLs queued but not fetched (max_pages reached): a rerun continues
    skips: Skips = field(default_factory=lambda: Skips(Counter(dict.fromkeys(SKIP_REASONS, 0))))  # URLs by reason

    @property
    def skipped(self) -> Counter:
        return self.skips.counts

    @property
    def examples(self) -> dict:
        return self.skips.examples

    def skip(self, reason: str, url: str) -> None:
        self.skips.add(reason, url)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "skips"}
        return {**d, "skipped": dict(self.skipped), "examples": copy.deepcopy(self.examples)}


# ------------------------------------------------------------------------------------------------ state

class CrawlState:
    """The crawl's durable state: `crawl_state.jsonl`, one event per line, replayed on start.

    Events: start {seed}, run {}, end {elapsed}, robots {origin, status, body, ...}, claim {url, host, t},
    page {urls, outcome, queued [[url, depth]], skips {reason: [url]}, requests, bytes, doc, warc, jsonl, elapsed}.
    """

    def __init__(self, path: Path, start_url: str, out_dir: Path):
        self.path = path
        self.seed: str | None = None
        self.frontier: deque[tuple[str, int]] = deque()
        self.seen: set[str] = set()
        self.depth_skipped: set[str] = set()
        self.claimed: set[str] = set()
        self.finished: set[str] = set()
        self.last_claim: dict[str, float] = {}  # host -> wall time of its last request (delay across restarts)
        self.robots: dict[str, tuple[int, str]] = {}
        self.offsets = {"warc": 0, "jsonl": 0}
        self.elapsed = 0.0
        self.report = CrawlReport(start_url=start_url, out_dir=str(out_dir))
        self._fh = None

    def open(self) -> None:
        """Replay the log (dropping a half-written last line), then open it for appending, locked."""
        queued: list[tuple[str, int]] = []
        good = 0
        if self.path.exists():
            with open(self.path, "rb") as f:
                for line in f:
                    if not line.endswith(b"\n"):
                        break
                    try:
                        ev = json.loads(line)
                    except ValueError:
                        break
                    self._apply(ev, queued)
                    good += len(line)
        self.frontier = deque((u, d) for u, d in queued if u not in self.claimed and u not in self.finished)
        self._fh = open(self.path, "ab")
        try:
            import fcntl

            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError as e:
            self._fh.close()
            raise UserError(f"{self.path.parent}: another crawl is writing there (lock held)") from e
        self._fh.truncate(good)

    def _apply(self, ev: dict, queued: list) -> None:
        kind, r = ev.get("ev"), self.report
        if kind == "start":
            self.seed = ev["seed"]
        elif kind == "run":
            r.runs += 1
        elif kind == "robots":
            self.robots[ev["origin"]] = (ev["status"], ev["body"])
            r.requests += ev.get("requests", 1)
            r.bytes += ev.get("bytes", 0)
            self.offsets = {"warc": ev["warc"], "jsonl": ev["jsonl"]}
        elif kind == "claim":
            self.claimed.add(ev["url"])
            self.seen.add(ev["url"])
            self.last_claim[ev["host"]] = ev["t"]
        elif kind == "page":
            self.finished.update(ev["urls"])
            self.seen.update(ev["urls"])
            for url, depth in ev.get("queued", []):
                queued.append((url, depth))
                self.seen.add(url)
            for reason, urls in ev.get("skips", {}).items():
                for url in urls:
                    r.skip(reason, url)
                    (self.depth_skipped if reason == "depth" else self.seen).add(url)
            r.fetched += ev.get("fetched", 0)
            r.requests += ev.get("requests", 0)
            r.bytes += ev.get("bytes", 0)
            r.documents += int(ev.get("doc", False))
            if "warc" in ev:
                self.offsets = {"warc": ev["warc"], "jsonl": ev["jsonl"]}
        if "elapsed" in ev:
            self.elapsed = ev["elapsed"]

    def append(self, ev: dict) -> None:
        self._fh.write((json.dumps(ev, ensure_ascii=False) + "\n").encode("utf-8"))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._apply(ev, [])

    def close(self) -> None:
        if self._fh is not None and not self._fh.closed:
            self._fh.close()


def write_json_atomic(path: Path, obj: dict) -> None:
    """Write `obj` as indented JSON via a temp file and a rename, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
