"""HTML -> main text with trafilatura (navigation, boilerplate, scripts and comments removed), per-document time limit.

The time limit. trafilatura can spend minutes on a pathological page, and a thread cannot be
stopped from outside, so:
- in the main thread of a process (the CLI, and the main thread of each pipeline worker process,
  which is where multiprocessing and concurrent.futures run their tasks), a `SIGALRM` interval
  timer raises `ExtractionTimeout` inside the extraction; the extraction really stops, and any
  timer and handler that were set before are restored afterwards;
- anywhere else (a thread, or a platform without `setitimer`), the extraction runs in a daemon
  thread that is waited for `timeout_s`; on timeout the document is given up as
  `extraction_timeout`, but that thread runs on until trafilatura returns (its CPU time is lost).
`ExtractionTimeout` derives from BaseException so that trafilatura's own `except Exception`
blocks cannot swallow it.
"""
from __future__ import annotations

import re
import signal
import threading
import time
from typing import Callable, TypeVar

from lmforge.data.base import Document, MapStep, StepStats
from lmforge.data.warc import HTML_TYPES, media_type

T = TypeVar("T")
_LANG = re.compile(r"^([a-zA-Z]{2,3})(?:[-_][a-zA-Z0-9]{1,8})*$")


class ExtractionTimeout(BaseException):
    """The extraction of one document ran past its time limit."""


def run_with_timeout(fn: Callable[[], T], timeout_s: float | None) -> T:
    """`fn()`, or `ExtractionTimeout` once `timeout_s` seconds have passed (see the module docstring)."""
    if not timeout_s or timeout_s <= 0:
        return fn()
    if hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread():
        return _run_with_alarm(fn, timeout_s)
    return _run_in_thread(fn, timeout_s)


def _run_with_alarm(fn: Callable[[], T], timeout_s: float) -> T:
    def on_alarm(signum, frame):
        raise ExtractionTimeout(f"extraction took longer than {timeout_s:g} s")

    t0 = time.monotonic()
    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)  # a firing between fn's return and here is still a timeout
    finally:
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:  # someone else's timer: re-arm it with what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


def _run_in_thread(fn: Callable[[], T], timeout_s: float) -> T:
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, name="lmforge-extract", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise ExtractionTimeout(f"extraction took longer than {timeout_s:g} s (left running in a thread)")
    if "error" in box:
        raise box["error"]
    return box["value"]


def html_language(tree) -> str | None:
    """The primary language subtag declared by the page: <html lang|xml:lang>, Content-Language, og:locale."""
    candidates = [tree.get("lang"), tree.get("{http://www.w3.org/XML/1998/namespace}lang")]
    for meta in tree.iter("meta"):
        key = (meta.get("http-equiv") or meta.get("property") or meta.get("name") or "").lower()
        if key in ("content-language", "og:locale", "language"):
            candidates.append(meta.get("content"))
    for c in candidates:
        m = _LANG.match((c or "").strip().split(",")[0].strip())
        if m:
            return m.group(1).lower()
    return None


def _extract(html: str, url: str | None) -> tuple[str | None, dict]:
    from trafilatura import bare_extraction
    from trafilatura.utils import load_html

    tree = load_html(html)
    if tree is None:
        return None, {}
    meta: dict = {}
    lang = html_language(tree)
    if lang:
        meta["language"] = lang
    title = page_title(tree)
    if title:
        meta["title"] = title
    # with_metadata=False: trafilatura's metadata pass costs ~40 % more time per page (bench/pipeline.py);
    # the title and declared language above are what the pipeline keeps.
    result = bare_extraction(tree, url=url, include_comments=False, with_metadata=False, include_tables=True,
                             include_images=False, include_links=False, include_formatting=False)
    if result is None:
        return None, meta
    found = result if isinstance(result, dict) else result.as_dict()  # trafilatura 1.x returned a dict
    return found.get("text"), meta


def page_title(tree) -> str | None:
    """og:title, else <title> without its site-name suffix (the first <h1> when <title> contains it), else <h1>."""
    def text_of(path: str) -> str:
        el = tree.find(path)
        if el is None:
            return ""
        return " ".join(((el.get("content") if el.tag == "meta" else el.text_content()) or "").split())

    og, title, h1 = text_of(".//meta[@property='og:title']"), text_of(".//title"), text_of(".//h1")
    if og:
        return og
    if title and h1 and h1 in title:
        return h1
    return title or h1 or None


def extract_html(html: str, url: str | None = None, timeout_s: float = 10.0) -> tuple[str | None, dict]:
    """Main text of an HTML page and its metadata: `(text, {"title", "language"})` (keys present when known).

    On failure the text is None and `meta["extract_failure"]` says why: "empty" (no main text),
    "timeout" (past `timeout_s`), or "error" (with `meta["extract_error"]`, the exception).
    """
    try:
        text, meta = run_with_timeout(lambda: _extract(html, url), timeout_s)
    except ExtractionTimeout:
        return None, {"extract_failure": "timeout"}
    except Exception as e:  # noqa: BLE001 - one bad page must not stop a run; counted by the caller
        return None, {"extract_failure": "error", "extract_error": f"{type(e).__name__}: {e}"[:200]}
    if not text or not text.strip():
        return None, {**meta, "extract_failure": "empty"}
    return text.strip(), meta


def is_html_document(doc: Document) -> bool:
    """`meta.format` "html", or no format and an HTML `meta.content_type` (extracted docs get format "text")."""
    fmt = doc.meta.get("format")
    if fmt is not None:
        return fmt == "html"
    return media_type(doc.meta.get("content_type")) in HTML_TYPES


def extract_step(timeout_s: float = 10.0) -> MapStep:
    """Replace HTML documents by their main text; other documents pass unchanged (counted `not_html`).

    Drops: `extraction_empty`, `extraction_timeout`, `extraction_error`. The extracted title and
    language are added to `meta` (values already there are kept); `meta.format` becomes "text".
    """
    def extract_one(doc: Document, stats: StepStats) -> Document | None:
        if not is_html_document(doc):
            stats.counters["not_html"] += 1
            return doc
        text, found = extract_html(doc.text, doc.url, timeout_s)
        if text is None:
            detail = found.get("extract_error")
            stats.drop(f"extraction_{found['extract_failure']}", f"{doc.id}: {detail}" if detail else doc.id)
            return None
        stats.counters["extracted"] += 1
        meta = {**doc.meta, "format": "text"}
        for key, value in found.items():
            meta.setdefault(key, value)
        return Document(id=doc.id, text=text, url=doc.url, source=doc.source, meta=meta)

    return MapStep("extract", extract_one)
