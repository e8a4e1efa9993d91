"""HTML -> main text: boilerplate gone, title and language kept, the time limit holds, the step counts drops."""
from __future__ import annotations

import signal
import threading
import time

import pytest

from lmforge.data.base import Document, StepStats, counted
from lmforge.data.extract import extract_html, extract_step, run_with_timeout, ExtractionTimeout

PAGE = """<!DOCTYPE html>
<html lang="en-GB"><head><meta charset="utf-8">
<title>Tidal pools of the north coast | Shore Notes</title>
<script>var tracking = "SCRIPT_MARKER"; function track() { return 1; }</script>
<style>.nav { color: red } /* STYLE_MARKER */</style></head>
<body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us NAV_MARKER</a></li>
<li><a href="/shop">Shop</a></li></ul></nav>
<header><div class="menu">Subscribe | Login | HEADER_MARKER</div></header>
<main><article>
<h1>Tidal pools of the north coast</h1>
<p>Tidal pools form where the retreating sea leaves water trapped among the rocks. Twice a day the pools are
cut off from the ocean, and the creatures living in them must survive heat, changing salinity and hungry birds
until the tide returns.</p>
<p>Anemones close into tight green buttons when the water drains away, while small crabs hide under ledges.
Periwinkles graze on the thin film of algae that coats every surface, and starfish move slowly across the
bottom in search of mussels.</p>
<p>Visitors should step only on bare rock, return any stone they lift to its place, and never take animals
home. The pools are most varied in the hour before low tide, when the lowest zone is exposed.</p>
</article>
<section class="comments"><h3>Comments</h3><div class="comment">COMMENT_MARKER great post!</div></section>
</main>
<footer><p>Copyright 2026 Shore Notes FOOTER_MARKER. All rights reserved.</p><a href="/privacy">Privacy</a></footer>
<script>document.write("SCRIPT2_MARKER")</script>
</body></html>"""


def test_extract_html_main_text_title_language():
    text, meta = extract_html(PAGE, "https://shore.example/tidal-pools")
    assert "Anemones close into tight green buttons" in text and "lowest zone is exposed" in text
    for marker in ("SCRIPT_MARKER", "SCRIPT2_MARKER", "STYLE_MARKER", "NAV_MARKER", "HEADER_MARKER",
                   "FOOTER_MARKER", "COMMENT_MARKER", "var tracking"):
        assert marker not in text, marker
    assert meta == {"title": "Tidal pools of the north coast", "language": "en"}


def test_extract_html_empty_and_error():
    text, meta = extract_html("<html lang='de'><head><title>T</title></head><body><script>go()</script></body></html>")
    assert text is None and meta["extract_failure"] == "empty" and meta["language"] == "de"
    text, meta = extract_html("")
    assert text is None and meta["extract_failure"] in ("empty", "error")


def _hang(*args, **kwargs):
    while True:  # a pathological page: pure-Python work that never ends
        time.sleep(0.01)


def test_extract_timeout_main_thread(monkeypatch):
    import trafilatura

    monkeypatch.setattr(trafilatura, "bare_extraction", _hang)
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)  # someone else's timer survives ours
        t0 = time.monotonic()
        text, meta = extract_html(PAGE, timeout_s=0.2)
        assert text is None and meta == {"extract_failure": "timeout"}
        assert time.monotonic() - t0 < 1.5
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < left < 5.0
        assert signal.getsignal(signal.SIGALRM) is not None and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_extract_timeout_off_main_thread(monkeypatch):
    import trafilatura

    monkeypatch.setattr(trafilatura, "bare_extraction", lambda *a, **k: time.sleep(0.6))
    out = {}
    th = threading.Thread(target=lambda: out.update(r=extract_html(PAGE, timeout_s=0.1)))
    th.start()
    th.join()
    assert out["r"] == (None, {"extract_failure": "timeout"})
    assert run_with_timeout(lambda: 7, 0.5) == 7
    with pytest.raises(ExtractionTimeout):
        run_with_timeout(lambda: time.sleep(1), 0.05)


def test_extract_step(monkeypatch):
    docs = [Document(id="html", text=PAGE, url="https://shore.example/p", meta={"format": "html"}),
            Document(id="ctype", text=PAGE, meta={"content_type": "text/html", "title": "Kept title"}),
            Document(id="plain", text="<b>plain text that mentions tags</b>", meta={"format": "text"}),
            Document(id="nothing", text="<html><body></body></html>", meta={"format": "html"})]
    stats = StepStats("extract")
    out = {d.id: d for d in counted(extract_step(timeout_s=5), docs, stats)}
    assert set(out) == {"html", "ctype", "plain"}
    assert "Tidal pools form" in out["html"].text and "NAV_MARKER" not in out["html"].text
    assert out["html"].meta == {"format": "text", "title": "Tidal pools of the north coast", "language": "en"}
    assert out["ctype"].meta["title"] == "Kept title" and out["ctype"].meta["format"] == "text"
    assert out["plain"].text == docs[2].text
    assert stats.drops == {"extraction_empty": 1} and stats.examples == {"extraction_empty": ["nothing"]}
    assert stats.counters == {"extracted": 2, "not_html": 1}

    import trafilatura

    monkeypatch.setattr(trafilatura, "bare_extraction", _hang)
    stats = StepStats("extract")
    assert list(counted(extract_step(timeout_s=0.1), docs[:1], stats)) == []
    assert stats.drops == {"extraction_timeout": 1}

    def boom(*a, **k):
        raise RuntimeError("lxml exploded")
    monkeypatch.setattr(trafilatura, "bare_extraction", boom)
    stats = StepStats("extract")
    assert list(counted(extract_step(), docs[:1], stats)) == []
    assert stats.drops == {"extraction_error": 1} and "lxml exploded" in stats.examples["extraction_error"][0]
