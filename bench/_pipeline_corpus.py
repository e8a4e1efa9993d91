"""The HTML corpus of bench/pipeline.py: pydoc's pages of stdlib modules, prose article pages, planted near-duplicates.

pydoc pages are real HTML (layout tables, navigation, index tables) but their text is code and
reST markup: Gopher's alpha-word rule drops nearly all of them, in both tools. So that the steps
after it have work, the rest are article pages: a site template (header, nav, sidebar of related
links, footer, script) around real prose, 12 Alpaca answers per page (`../shared/data/alpaca_5000.json`),
with a contact line (email, phone or server IP) on every fifth page for the PII step. Planted
near-duplicates copy a random article with a new title and one extra paragraph.
"""
from __future__ import annotations

import contextlib
import html
import importlib
import io
import json
import pkgutil
import pydoc
import random
import sys
import warnings
from pathlib import Path

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"
# Modules whose import has side effects (opens a browser, prints, needs a display) or that are tests.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "lib2to3", "ensurepip",
        "venv", "pydoc_data", "test", "tests"}
RECORDS_PER_ARTICLE = 12
CONTACTS = ["Questions about this page? Write to the editor, {name}.{n}@fieldnotes-mail.com.",
            "Corrections can be phoned in to our desk at (212) 555-{n:04d} during office hours.",
            "Mirror maintainers: the archive server at 93.184.{o}.{p} syncs this page nightly."]


def module_names() -> list[str]:
    """Standard-library modules and their submodules, sorted; private and side-effect modules left out."""
    names = []
    for top in sorted(n for n in sys.stdlib_module_names if n not in SKIP and not n.startswith("_")):
        names.append(top)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                mod = importlib.import_module(top)
        except BaseException:  # noqa: BLE001 - a module this platform lacks
            continue
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), top + "."):
            if not any(p in SKIP or p.startswith("_") for p in info.name.split(".")):
                names.append(info.name)
    return names


def pydoc_pages(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` pydoc module pages (fewer if the platform has fewer importable modules)."""
    names = module_names()
    rng.shuffle(names)
    doc, pages = pydoc.HTMLDoc(), []
    for name in names:
        if len(pages) == n:
            break
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
                pages.append((f"pydoc/{name}", doc.page(f"Python: module {name}", doc.docmodule(mod))))
        except BaseException:  # noqa: BLE001 - unimportable here: skip
            continue
    return pages


def article(i: int, records: list[dict], related: list[str], rng: random.Random) -> str:
    """One article page: site chrome around the records' prose."""
    esc = html.escape
    title = records[0]["instruction"].rstrip(".?!")
    body = []
    for r in records:
        body.append(f"<h2>{esc(r['instruction'])}</h2>")
        if r.get("input"):
            body.append(f"<blockquote><p>{esc(r['input'])}</p></blockquote>")
        body += [f"<p>{esc(p)}</p>" for p in r["output"].split("\n") if p.strip()]
    if i % 5 == 0:
        line = CONTACTS[(i // 5) % 3].format(name=rng.choice(["jane", "omar", "li", "ana"]), n=i, o=i % 250, p=7)
        body.append(f"<p>{esc(line)}</p>")
    nav = "".join(f'<li><a href="/section/{s}">{s.title()}</a></li>'
                  for s in ("news", "guides", "science", "language", "howto", "about"))
    aside = "".join(f'<li><a href="/a/{j}">{esc(t)}</a></li>' for j, t in enumerate(related))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)} | Field Notes</title>'
            f'<link rel="stylesheet" href="/static/site.css"><script>window.dataLayer=[];function gtag()'
            f'{{dataLayer.push(arguments)}}</script></head><body><header><a class="logo" href="/">Field Notes</a>'
            f'<nav><ul>{nav}</ul></nav><form action="/search"><input name="q"></form></header><main><article>'
            f'<h1>{esc(title)}</h1><p class="byline">By the Field Notes staff, March {1 + i % 28}, 2024</p>'
            f'{"".join(body)}</article><aside><h3>Related</h3><ul>{aside}</ul></aside></main><footer>'
            f'<p>&copy; 2024 Field Notes. <a href="/privacy">Privacy</a> <a href="/terms">Terms</a> '
            f'<a href="/rss">RSS</a></p></footer></body></html>')


def article_pages(n: int, rng: random.Random) -> list[tuple[str, str]]:
    """`n` article pages of Alpaca prose (none when the shared data is missing)."""
    if not ALPACA.is_file():
        return []
    records = [r for r in json.loads(ALPACA.read_text()) if len(r["output"].split()) >= 20]
    n = min(n, len(records) // RECORDS_PER_ARTICLE)
    titles = [r["instruction"] for r in records[:200]]
    return [(f"article/{i}", article(i, records[i * RECORDS_PER_ARTICLE:(i + 1) * RECORDS_PER_ARTICLE],
                                     rng.sample(titles, 8), rng)) for i in range(n)]


def build_pages(n: int, seed: int, planted: float = 0.1) -> tuple[list[tuple[str, str]], dict]:
    """`n` (id, html) pages in a seeded order: ~half pydoc, the rest articles and planted copies of articles."""
    rng = random.Random(seed)
    n_planted = int(n * planted)
    pages = pydoc_pages(n // 2, rng)
    articles = article_pages(n - n_planted - len(pages), rng)
    copies = []
    for i in range(n_planted if articles else 0):
        name, page = rng.choice(articles)
        page = page.replace("<title>", f"<title>Reposted ({i}): ", 1).replace(
            "<h1>", f"<p>This guide first appeared in our weekly letter, issue {i}; reposted with permission.</p><h1>", 1)
        copies.append((f"{name}~copy{i}", page))
    pages += articles + copies
    rng.shuffle(pages)
    return pages, {"pydoc": len(pages) - len(articles) - len(copies), "article": len(articles), "planted": len(copies)}
