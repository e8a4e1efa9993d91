"""The human-evaluation web app: pairwise votes, 1–5 ratings, a leaderboard and its CSV.

Pages are plain HTML forms (no JavaScript needed). Answers are untrusted model output: Jinja2
escapes every value (autoescape on, nothing marked safe), and a Content-Security-Policy that allows
no scripts at all backs that up. Which models wrote the answers on a page is kept server-side behind
the page's token (see store.py: tokens expire, take one vote, and cannot pile up).

Abuse. Votes and ratings are rate-limited per voter (the browser cookie) and per client address
(so dropping the cookie does not reset the count), answering 429. With a password every page but
/health needs HTTP Basic auth (any user name); wrong passwords from one address are limited too.
"""
from __future__ import annotations

import base64
import binascii
import csv
import hmac
import io
import itertools
import math
import random
import re
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import DictLoader, Environment
from starlette.concurrency import run_in_threadpool

from lmforge.eval.human.answers import Prompt
from lmforge.eval.human.ratings import Row, identified, leaderboard
from lmforge.eval.human.store import Store, VoteError

COOKIE = "lmforge_voter"
VOTER_ID = re.compile(r"[0-9a-f]{32}")  # what the server issues; any other cookie value gets a new id
PASSWORD_ENV = "LMFORGE_HUMAN_PASSWORD"
REALM = 'Basic realm="lmforge human eval", charset="UTF-8"'
LOGIN_FAILURES_PER_MINUTE = 10  # wrong passwords one address may send; then 429 for the rest of the minute
MAX_FORM_BYTES = 4096
HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                                      "base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
RUBRIC = [(5, "Excellent", "fully correct, complete, clear and helpful"),
          (4, "Good", "correct and helpful, with minor issues"),
          (3, "Acceptable", "partly correct or incomplete, but usable"),
          (2, "Poor", "mostly wrong, unclear or unhelpful"),
          (1, "Very poor", "wrong, irrelevant, nonsensical or harmful")]
FLASH = {"vote": "Vote recorded. Here is the next pair.", "rating": "Rating recorded. Here is the next answer."}

TEMPLATES = {
    "base.html": """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }} - lmforge human eval</title>
<style>
body { font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 72rem; padding: 0 1rem 2rem; color: #1d1d1f; }
nav { padding: .8rem 0; border-bottom: 1px solid #ddd; margin-bottom: 1rem; }
nav a { margin-right: 1.2rem; }
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f6f8; padding: .8rem; border-radius: 6px;
      font: 14px/1.4 ui-monospace, monospace; margin: .3rem 0 1rem; }
.answers { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 1rem; }
@media (max-width: 50rem) { .answers { grid-template-columns: 1fr; } }
button { font-size: 1rem; padding: .5rem 1rem; margin: .2rem .4rem .2rem 0; cursor: pointer; }
.flash { background: #e8f5e9; padding: .5rem .8rem; border-radius: 6px; }
.note { color: #555; font-size: .9rem; }
table { border-collapse: collapse; }
th, td { padding: .35rem .7rem; border-bottom: 1px solid #ddd; text-align: right; }
th:nth-child(2), td:nth-child(2) { text-align: left; }
</style></head>
<body><nav><a href="/">Compare</a><a href="/rate">Rate</a><a href="/results">Results</a></nav>
<main>{% if flash %}<p class="flash" id="flash">{{ flash }}</p>{% endif %}{% block main %}{% endblock %}</main>
</body></html>""",
    "pair.html": """{% extends "base.html" %}{% block main %}
<h1>Which answer is better?</h1>
<h2>Prompt</h2><pre id="prompt">{{ prompt }}</pre>
<div class="answers">
<section><h2>Answer A</h2><pre id="answer-a">{{ answer_a }}</pre></section>
<section><h2>Answer B</h2><pre id="answer-b">{{ answer_b }}</pre></section>
</div>
<form method="post" action="/vote">
<input type="hidden" name="token" value="{{ token }}">
<button name="winner" value="a" id="vote-a">A is better</button>
<button name="winner" value="b" id="vote-b">B is better</button>
<button name="winner" value="tie" id="vote-tie">Tie</button>
<button name="winner" value="both_bad" id="vote-both-bad">Both are bad</button>
</form>
<p class="note">Two different models wrote these answers, shown in random order; which one wrote which is
hidden. Judge correctness first, then completeness, clarity and helpfulness; ignore length for its own sake.</p>
{% endblock %}""",
    "rate.html": """{% extends "base.html" %}{% block main %}
<h1>How good is this answer?</h1>
<h2>Prompt</h2><pre id="prompt">{{ prompt }}</pre>
<h2>Answer</h2><pre id="answer">{{ answer }}</pre>
<form method="post" action="/rate">
<input type="hidden" name="token" value="{{ token }}">
{% for score, name, text in rubric %}<div><button name="score" value="{{ score }}" id="rate-{{ score }}">{{ score }}
- {{ name }}</button> {{ text }}</div>
{% endfor %}</form>
{% endblock %}""",
    "results.html": """{% extends "base.html" %}{% block main %}
<h1>Leaderboard</h1>
<p id="totals">{{ n_votes }} pairwise vote{{ "" if n_votes == 1 else "s" }}, {{ n_scores }}
rating{{ "" if n_scores == 1 else "s" }} (1-5).</p>
<table id="leaderboard">
<thead><tr><th>#</th><th>Model</th><th>Bradley-Terry</th><th>95% CI</th><th>Elo</th><th>Votes</th>
<th>W / T / L</th><th>Both bad</th><th>Mean 1-5 (n)</th></tr></thead>
<tbody>{% for r in rows %}
<tr><td>{{ loop.index }}</td><td>{{ r.model }}</td>
<td>{{ "%.1f"|format(r.bt) if r.bt is not none else "-" }}</td>
<td>{{ "%.1f to %.1f"|format(r.bt_low, r.bt_high) if r.bt_low is not none else "-" }}</td>
<td>{{ "%.1f"|format(r.elo) }}</td><td>{{ r.votes }}</td><td>{{ r.wins }} / {{ r.ties }} / {{ r.losses }}</td>
<td>{{ r.both_bad }}</td>
<td>{{ "%.2f (%d)"|format(r.score_mean, r.score_n) if r.score_n else "- (0)" }}</td></tr>
{% endfor %}</tbody></table>
{% if not fitted %}<p class="note" id="bt-note">Bradley-Terry ratings appear once every model can be reached from
every other through wins (a tie counts both ways); until then some models have only won or only lost against
the rest, and their maximum-likelihood ratings are infinite.</p>{% endif %}
<p><a href="/results.csv" id="csv">Download CSV</a></p>
<p class="note">Elo: online updates in vote order, K = 4, base 10, scale 400, start 1000. Bradley-Terry:
maximum likelihood as Chatbot Arena computes it (ties and "both bad" count half a win for each side), ratings
averaging 1000; the 95% interval is the 2.5th to 97.5th percentile over {{ rounds }} bootstrap resamplings of
the votes. Ratings (1-5) are shown separately and do not enter either.</p>
{% endblock %}""",
}


@dataclass
class Session:
    """What the app serves: the votes store, the models, the prompts and every (model, prompt id) answer, and the
    limits: votes per minute per voter and per address (0: none), and the password (None: open)."""
    store: Store
    models: list[str]
    prompts: list[Prompt]
    answers: dict[tuple[str, str], str]
    seed: int = 0
    rounds: int = 1000
    votes_per_minute: int = 30
    address_votes_per_minute: int = 120
    password: str | None = field(default=None, repr=False)


class RateLimiter:
    """At most `limit` events per key in any `window_s` seconds (a sliding window), thread-safe.

    Memory stays bounded: keys whose window has emptied are dropped once there are many of them."""

    def __init__(self, limit: int, window_s: float = 60.0):
        self.limit, self.window_s = limit, window_s
        self.events: dict[str, deque] = {}
        self.lock = threading.Lock()

    def wait(self, key: str) -> float:
        """Seconds until `key` may have another event (0: now)."""
        now = time.monotonic()
        with self.lock:
            q = self.events.get(key)
            while q and q[0] <= now - self.window_s:
                q.popleft()
            return 0.0 if not q or len(q) < self.limit else q[0] + self.window_s - now

    def add(self, key: str) -> None:
        now = time.monotonic()
        with self.lock:
            if len(self.events) > 10_000:  # many one-off keys (e.g. cookies thrown away): forget the idle ones
                self.events = {k: q for k, q in self.events.items() if q and q[-1] > now - self.window_s}
            self.events.setdefault(key, deque()).append(now)


def password_ok(header: str | None, password: str) -> bool:
    """Whether an `Authorization: Basic ...` header carries `password` (any user name); compared in constant time."""
    if not header or not header.startswith("Basic "):
        return False
    try:
        _, _, given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(given.encode(), password.encode())


@lru_cache(maxsize=1)
def _templates() -> Environment:
    """The page templates; autoescape on, nothing marked safe."""
    return Environment(loader=DictLoader(TEMPLATES), autoescape=True)


def _page(request: Request, name: str, voter: str, **ctx) -> HTMLResponse:
    """A rendered page (with the flash message a redirect asked for), setting the voter cookie when it is new."""
    flash = FLASH.get(request.query_params.get("done", ""))
    response = HTMLResponse(_templates().get_template(name).render(flash=flash, **ctx))
    if request.cookies.get(COOKIE) != voter:
        response.set_cookie(COOKIE, voter, max_age=365 * 86400, httponly=True, samesite="lax")
    return response


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise VoteError(f"form body over {MAX_FORM_BYTES} bytes", status=413)
    return {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}


def _voter(request: Request) -> str:
    """The voter id from the cookie the server issued, or a new one (a page shown now is bound to it)."""
    voter = request.cookies.get(COOKIE, "")
    return voter if VOTER_ID.fullmatch(voter) else secrets.token_hex(16)


def _address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


class _Draws:
    """Which prompt and models a page shows: one seeded generator, shared by every request thread."""

    def __init__(self, session: Session):
        self.session, self.rng, self.lock = session, random.Random(session.seed), threading.Lock()
        self.pairs = list(itertools.combinations(session.models, 2))

    def pair(self) -> tuple[Prompt, str, str]:
        with self.lock:
            prompt = self.rng.choice(self.session.prompts)
            a, b = self.rng.sample(self.rng.choice(self.pairs), 2)
        return prompt, a, b

    def one(self) -> tuple[Prompt, str]:
        with self.lock:
            return self.rng.choice(self.session.prompts), self.rng.choice(self.session.models)


class _Board:
    """The leaderboard, computed once per change of the votes however many people reload."""

    def __init__(self, session: Session):
        self.session, self.lock, self.version, self.value = session, threading.Lock(), None, None

    def __call__(self) -> tuple[list[Row], bool, int, int]:
        s = self.session
        with self.lock:
            version = s.store.version()
            if self.version != version:
                votes, scores = s.store.votes(), s.store.scores()
                rows = leaderboard(votes, scores, s.models, rounds=s.rounds, seed=s.seed)
                self.version, self.value = version, (rows, identified(votes, s.models), len(votes), len(scores))
            return self.value


def create_app(session: Session) -> FastAPI:
    """The FastAPI app: / (vote), /rate, /results, /results.csv, /health."""
    draws, board = _Draws(session), _Board(session)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    per_voter, logins = RateLimiter(session.votes_per_minute), RateLimiter(LOGIN_FAILURES_PER_MINUTE)
    per_address = RateLimiter(session.address_votes_per_minute) if session.address_votes_per_minute else None

    @app.middleware("http")
    async def password_gate(request: Request, call_next):  # added first, so security_headers wraps its answers
        if session.password is None or request.url.path == "/health":
            return await call_next(request)
        address, header = _address(request), request.headers.get("authorization")
        wait = logins.wait(address)
        if wait:  # checked before the password, so guessing goes no faster once the limit is hit
            return PlainTextResponse(f"error: too many wrong passwords from {address}; wait {math.ceil(wait)} s\n",
                                     status_code=429, headers={"Retry-After": str(math.ceil(wait))})
        if password_ok(header, session.password):
            return await call_next(request)
        if header:
            logins.add(address)
        return PlainTextResponse("error: this page needs the password (HTTP Basic auth, any user name)\n",
                                 status_code=401, headers={"WWW-Authenticate": REALM})

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(HEADERS)
        return response

    @app.exception_handler(VoteError)
    async def vote_error(request: Request, e: VoteError):
        headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
        return PlainTextResponse(f"error: {e}\n", status_code=e.status, headers=headers)

    def limit_votes(request: Request, voter: str) -> None:
        """Count one vote or rating against the voter's and the address's limits; VoteError 429 past either."""
        checks = [(per_voter, voter, "this voter")]
        if per_address is not None:
            checks.insert(0, (per_address, _address(request), f"address {_address(request)}"))
        for limiter, key, who in checks:
            wait = limiter.wait(key)
            if wait:
                raise VoteError(f"too many votes from {who}: at most {limiter.limit} a minute; wait "
                                f"{math.ceil(wait)} s", status=429, retry_after=math.ceil(wait))
        for limiter, key, _ in checks:
            limiter.add(key)

    @app.get("/health")
    def health():
        return PlainTextResponse("ok\n")

    @app.get("/", response_class=HTMLResponse)
    def compare(request: Request):
        prompt, a, b = draws.pair()
        voter = _voter(request)
        token = session.store.show(prompt.id, a, b, voter=voter)
        return _page(request, "pair.html", voter, title="Compare", prompt=prompt.text, token=token,
                     answer_a=session.answers[(a, prompt.id)], answer_b=session.answers[(b, prompt.id)])

    @app.post("/vote")
    async def vote(request: Request):
        fields = await _form(request)
        voter = request.cookies.get(COOKIE, "")
        limit_votes(request, voter)
        await run_in_threadpool(session.store.vote, fields.get("token", ""), fields.get("winner", ""), voter)
        return RedirectResponse("/?done=vote", status_code=303)

    @app.get("/rate", response_class=HTMLResponse)
    def rate_page(request: Request):
        prompt, model = draws.one()
        voter = _voter(request)
        token = session.store.show(prompt.id, model, voter=voter)
        return _page(request, "rate.html", voter, title="Rate", prompt=prompt.text,
                     answer=session.answers[(model, prompt.id)], token=token, rubric=RUBRIC)

    @app.post("/rate")
    async def rate(request: Request):
        fields = await _form(request)
        voter = request.cookies.get(COOKIE, "")
        limit_votes(request, voter)
        await run_in_threadpool(session.store.rate, fields.get("token", ""), fields.get("score", ""), voter)
        return RedirectResponse("/rate?done=rating", status_code=303)

    @app.get("/results", response_class=HTMLResponse)
    def results_page(request: Request):
        rows, fitted, n_votes, n_scores = board()
        return _page(request, "results.html", _voter(request), title="Results", rows=rows, fitted=fitted,
                     n_votes=n_votes, n_scores=n_scores, rounds=session.rounds)

    @app.get("/results.csv")
    def results_csv():
        rows, _, _, _ = board()
        return Response(to_csv(rows), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="results.csv"'})

    return app


def to_csv(rows: list[Row]) -> str:
    """The leaderboard as CSV, one row per model, best first; empty cells where a value does not exist yet."""
    def num(x: float | None, digits: int = 2) -> str:
        return "" if x is None else f"{x:.{digits}f}"

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["rank", "model", "bt_rating", "bt_ci_low", "bt_ci_high", "elo", "votes", "wins", "ties", "losses",
                "both_bad", "score_mean", "score_n"])
    for i, r in enumerate(rows, 1):
        w.writerow([i, r.model, num(r.bt), num(r.bt_low), num(r.bt_high), num(r.elo), r.votes, r.wins, r.ties,
                    r.losses, r.both_bad, num(r.score_mean, 3), r.score_n])
    return buf.getvalue()


def serve(session: Session, host: str, port: int) -> None:
    """Serve the app until interrupted."""
    import uvicorn

    uvicorn.run(create_app(session), host=host, port=port, log_level="warning")
