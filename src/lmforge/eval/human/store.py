"""Votes and 1–5 ratings in SQLite, safe under many concurrent voters.

The database is in WAL mode (readers never block the writer) with a busy timeout, every call opens
its own connection, and each write is one `BEGIN IMMEDIATE` transaction, so concurrent writers queue
for the lock instead of failing. A page never names the models behind its answers: it carries a
random token, and the `shown` table maps the token to the prompt and models.

Tokens. A token is stored only when a page is shown, bound to the voter (browser cookie) it was
shown to, and takes one vote or rating, from that voter, within `token_ttl_s` of being shown.
The table cannot be grown by loading pages: each new token first prunes expired ones, a voter
keeps at most `tokens_per_voter` unused tokens (the oldest go), and the table at most `max_tokens`
rows (the oldest go), so a flood of page loads only evicts tokens, it never adds rows without bound.
"""
from __future__ import annotations

import secrets
import sqlite3
import time
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

from lmforge.eval.human.ratings import SCORE, Vote

BUSY_TIMEOUT_MS = 30_000
TOKEN_TTL_S = 3600.0  # a page's token is refused this long after the page was shown
MAX_TOKENS = 10_000  # rows the token table keeps at most, used or not
TOKENS_PER_VOTER = 20  # unused tokens one voter keeps (open tabs); a new page evicts their oldest
SCHEMA = """
CREATE TABLE IF NOT EXISTS shown (
    token TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'single')),
    prompt_id TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT,
    created REAL NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    voter TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    voter TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad'))
);
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    voter TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    model TEXT NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5)
);
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS shown_created ON shown (created);
CREATE INDEX IF NOT EXISTS shown_voter ON shown (voter, used);
"""


class VoteError(ValueError):
    """A vote or rating that cannot be recorded; `status` is the HTTP status it answers with."""

    def __init__(self, message: str, status: int = 400, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Store:
    """The votes database at `path`; `models` is the session's model set, the only models a vote may name.

    `token_ttl_s`, `max_tokens` and `tokens_per_voter` bound the token table (the module docstring)."""

    def __init__(self, path: str | Path, models: list[str], token_ttl_s: float = TOKEN_TTL_S,
                 max_tokens: int = MAX_TOKENS, tokens_per_voter: int = TOKENS_PER_VOTER):
        if token_ttl_s <= 0 or max_tokens < 1 or tokens_per_voter < 1:
            raise ValueError("token_ttl_s must be > 0, max_tokens and tokens_per_voter >= 1")
        self.path = Path(path)
        self.models = set(models)
        self.token_ttl_s, self.max_tokens, self.tokens_per_voter = token_ttl_s, max_tokens, tokens_per_voter
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self.connect()) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            if "voter" not in {row[1] for row in conn.execute("PRAGMA table_info(shown)")}:
                conn.execute("ALTER TABLE shown ADD COLUMN voter TEXT NOT NULL DEFAULT ''")  # a database from before
            conn.executescript(INDEXES)

    def connect(self) -> sqlite3.Connection:
        """A new connection in autocommit mode (transactions are explicit) that waits for locks."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn

    def journal_mode(self) -> str:
        with closing(self.connect()) as conn:
            return conn.execute("PRAGMA journal_mode").fetchone()[0]

    def show(self, prompt_id: str, model_a: str, model_b: str | None = None, *, voter: str) -> str:
        """Record what a page shows `voter` (two models: a pair to vote on; one: an answer to rate); its token.

        Expired tokens, the voter's oldest unused ones and the table's oldest rows go first, in the same transaction."""
        token, now = secrets.token_urlsafe(16), time.time()

        def write(conn):
            conn.execute("DELETE FROM shown WHERE created < ?", (now - self.token_ttl_s,))
            conn.execute("DELETE FROM shown WHERE voter = ? AND used = 0 AND rowid <= (SELECT rowid FROM shown "
                         "WHERE voter = ? AND used = 0 ORDER BY rowid DESC LIMIT 1 OFFSET ?)",
                         (voter, voter, self.tokens_per_voter - 1))
            cur = conn.execute("INSERT INTO shown (token, kind, prompt_id, model_a, model_b, created, voter) "
                               "VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (token, "single" if model_b is None else "pair", prompt_id, model_a, model_b, now,
                                voter))
            conn.execute("DELETE FROM shown WHERE rowid <= ?", (cur.lastrowid - self.max_tokens,))
        self._write(write)
        return token

    def tokens(self) -> int:
        """Rows in the token table (used or not): what the bounds above keep small."""
        with closing(self.connect()) as conn:
            return conn.execute("SELECT count(*) FROM shown").fetchone()[0]

    def _claim(self, conn: sqlite3.Connection, token: str, kind: str, voter: str) -> tuple[str, str, str | None]:
        """Mark the token used inside the caller's transaction; its (prompt id, model a, model b)."""
        row = conn.execute("SELECT kind, prompt_id, model_a, model_b, used, voter, created FROM shown "
                           "WHERE token = ?", (token,)).fetchone()
        if row is None or row[0] != kind:
            raise VoteError("unknown or expired token: reload the page to get a new one")
        if row[6] < time.time() - self.token_ttl_s:
            raise VoteError(f"this page expired ({self.token_ttl_s:g} s after it was shown): reload it to get a new "
                            "one")
        if row[4]:
            raise VoteError("this page was already voted on", status=409)
        if row[5] != voter:
            raise VoteError("this page was shown to another browser (voter cookie): reload it", status=403)
        unknown = [m for m in row[2:4] if m is not None and m not in self.models]
        if unknown:
            raise VoteError(f"model {unknown[0]!r} is not one of this session's models")
        conn.execute("UPDATE shown SET used = 1 WHERE token = ?", (token,))
        return row[1], row[2], row[3]

    def _write(self, fn):
        with closing(self.connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return out

    def vote(self, token: str, winner: str, voter: str) -> Vote:
        """Record a pairwise vote on the pair behind `token`; winner is a, b, tie or both_bad."""
        if winner not in SCORE:
            raise VoteError(f"winner must be one of {', '.join(SCORE)}, not {winner[:40]!r}")

        def write(conn):
            prompt_id, a, b = self._claim(conn, token, "pair", voter)
            conn.execute("INSERT INTO votes (ts, voter, prompt_id, model_a, model_b, winner) VALUES (?, ?, ?, ?, ?, ?)",
                         (_now(), voter, prompt_id, a, b, winner))
            return Vote(a, b, winner)
        return self._write(write)

    def rate(self, token: str, score: str | int, voter: str) -> int:
        """Record a 1–5 rating of the answer behind `token`."""
        if str(score) not in {"1", "2", "3", "4", "5"}:
            raise VoteError(f"rating must be an integer from 1 to 5, not {str(score)[:40]!r}")

        def write(conn):
            prompt_id, model, _ = self._claim(conn, token, "single", voter)
            conn.execute("INSERT INTO ratings (ts, voter, prompt_id, model, score) VALUES (?, ?, ?, ?, ?)",
                         (_now(), voter, prompt_id, model, int(score)))
            return int(score)
        return self._write(write)

    def votes(self) -> list[Vote]:
        """The votes between this session's models, oldest first (the order online Elo uses)."""
        with closing(self.connect()) as conn:
            rows = conn.execute("SELECT model_a, model_b, winner FROM votes ORDER BY id").fetchall()
        return [Vote(*r) for r in rows if r[0] in self.models and r[1] in self.models]

    def scores(self) -> list[tuple[str, int]]:
        """(model, 1–5 score) of every rating of this session's models."""
        with closing(self.connect()) as conn:
            rows = conn.execute("SELECT model, score FROM ratings ORDER BY id").fetchall()
        return [(m, s) for m, s in rows if m in self.models]

    def version(self) -> tuple:
        """Changes whenever a vote or rating is added: the key under which results are cached."""
        with closing(self.connect()) as conn:
            return (conn.execute("SELECT count(*), max(id) FROM votes").fetchone()
                    + conn.execute("SELECT count(*), max(id) FROM ratings").fetchone())
