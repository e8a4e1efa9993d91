"""lmforge eval human: hand-checked ratings, the vote store under concurrency, cached answers, the web app, and
the whole command in a real headless Chromium."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from conftest import ROOT, free_port, require, save_tiny, stop_server, wait_healthy
from lmforge.eval.human.answers import Settings, make_prompt, read_prompts
from lmforge.eval.human.ratings import Vote, bootstrap, bradley_terry, elo, identified, leaderboard
from lmforge.eval.human.store import Store, VoteError

XSS = "<script>window.pwned=1</script><b>bold</b>"


@pytest.fixture
def one_thread():
    """Generate with one CPU thread (the machine is shared), restoring the count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- ratings ------------------------------------------------------------------------------------
def test_elo_matches_hand_computation():
    # 1. A beats B from 1000 each: expected score 1/(1 + 10^0) = 0.5, so A = 1000 + 4 * 0.5 = 1002, B = 998.
    r = elo([Vote("A", "B", "a")])
    assert r == {"A": 1002.0, "B": 998.0}
    # 2. A beats B again: A expects e = 1/(1 + 10^(-4/400)) = 0.5057562; A = 1002 + 4 * (1 - e) = 1003.9769752.
    e = 1 / (1 + 10 ** (-4 / 400))
    assert e == pytest.approx(0.5057562084)
    # 3. "both bad" with B shown first counts as a tie: B expects eb = 1/(1 + 10^((A - B)/400)) = 0.4885553,
    #    so B = 996.0230248 + 4 * (0.5 - eb) = 996.0688035 and A loses the same 0.0457787.
    votes = [Vote("A", "B", "a"), Vote("A", "B", "a"), Vote("B", "A", "both_bad")]
    r = elo(votes)
    assert r["A"] == pytest.approx(1003.9311965, abs=1e-6)
    assert r["B"] == pytest.approx(996.0688035, abs=1e-6)
    assert elo([Vote("A", "B", "tie")]) == {"A": 1000.0, "B": 1000.0}  # equal ratings, a tie: nothing moves


def test_bradley_terry_matches_hand_computation():
    # A beats B 3 times out of 4: P(A > B) = 3/4 = 1 / (1 + 10^(-(RA - RB)/400)), so RA - RB = 400 log10 3
    # = 190.8485 around a mean of 1000: A = 1095.4243, B = 904.5757.
    votes = [Vote("A", "B", "a")] * 3 + [Vote("B", "A", "a")]
    r = bradley_terry(votes)
    assert r["A"] == pytest.approx(1000 + 200 * math.log10(3), abs=1e-3)
    assert r["B"] == pytest.approx(1000 - 200 * math.log10(3), abs=1e-3)
    assert r["A"] == pytest.approx(1095.4243, abs=1e-3)
    # A tie is half a win for each side: one win and one tie is 1.5 of 2, the same 3:1 odds.
    assert bradley_terry([Vote("A", "B", "a"), Vote("A", "B", "tie")]) == pytest.approx(r, abs=1e-3)
    # A chain: A beats B 2:1, B beats C 2:1 (never A against C): each gap is 400 log10 2 = 120.412, B in the middle.
    chain = [Vote("A", "B", "a")] * 2 + [Vote("A", "B", "b")] + [Vote("B", "C", "a")] * 2 + [Vote("C", "B", "a")]
    r = bradley_terry(chain)
    assert r["A"] == pytest.approx(1120.412, abs=1e-3)
    assert r["B"] == pytest.approx(1000.0, abs=1e-3)
    assert r["C"] == pytest.approx(879.588, abs=1e-3)


def _random_votes(n: int, seed: int) -> list[Vote]:
    rng = random.Random(seed)
    strength = {"m1": 0.0, "m2": 0.5, "m3": 1.0, "m4": -0.3}
    votes = []
    for _ in range(n):
        a, b = rng.sample(sorted(strength), 2)
        u = rng.random()
        p_a = 1 / (1 + math.exp(strength[b] - strength[a]))
        votes.append(Vote(a, b, "tie" if u < 0.15 else "both_bad" if u < 0.2 else "a" if rng.random() < p_a else "b"))
    return votes


def test_bradley_terry_equals_chatbot_arenas_logistic_regression():
    """Arena's compute_mle_elo: sklearn's unpenalised logistic regression on +-ln(10) rows, wins weighted 2, ties 1."""
    import numpy as np

    linear_model = require("sklearn.linear_model", why="scikit-learn, which lm-eval (the eval extra) installs")
    votes = _random_votes(300, seed=0)
    models = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    idx = {m: i for i, m in enumerate(models)}
    weight = np.zeros((4, 4))
    for v in votes:
        i, j = idx[v.model_a], idx[v.model_b]
        if v.winner == "a":
            weight[i, j] += 2
        elif v.winner == "b":
            weight[j, i] += 2
        else:
            weight[i, j] += 1
            weight[j, i] += 1
    X, Y, w = [], [], []
    for i in range(4):
        for j in range(4):
            if i != j:
                row = np.zeros(4)
                row[i], row[j] = math.log(10), -math.log(10)
                X += [row, row]
                Y += [1.0, 0.0]
                w += [weight[i, j], weight[j, i]]
    lr = linear_model.LogisticRegression(fit_intercept=False, C=np.inf, tol=1e-6)
    lr.fit(np.array(X), np.array(Y), sample_weight=w)
    want = dict(zip(models, 400 * lr.coef_[0] + 1000))
    got = bradley_terry(votes)
    assert got == pytest.approx(want, abs=0.01)
    assert sum(got.values()) == pytest.approx(4000)


def test_bootstrap_interval_contains_estimate_and_is_reproducible():
    votes = _random_votes(200, seed=1)
    point = bradley_terry(votes)
    ci = bootstrap(votes, rounds=300, seed=7)
    assert ci == bootstrap(votes, rounds=300, seed=7)
    assert ci != bootstrap(votes, rounds=300, seed=8)
    for m, (lo, hi) in ci.items():
        assert lo < point[m] < hi, m
        assert 10 < hi - lo < 300, m  # 200 votes: tens of points wide, not degenerate, not unbounded


def test_leaderboard_waits_for_an_identified_bradley_terry():
    one = [Vote("A", "B", "a")]  # A has only won: its maximum-likelihood rating is infinite
    assert not identified(one)
    rows = leaderboard(one, [("B", 4), ("B", 1)], ["A", "B", "C"], rounds=50)
    assert [r.model for r in rows] == ["A", "C", "B"]  # by Elo: 1002, 1000, 998
    assert all(r.bt is None and r.bt_low is None for r in rows)
    b = rows[2]
    assert (b.votes, b.wins, b.ties, b.losses, b.score_mean, b.score_n) == (1, 0, 0, 1, 2.5, 2)
    both = one + [Vote("B", "A", "both_bad")]
    assert identified(both)
    rows = leaderboard(both, [], ["A", "B"], rounds=50)
    assert rows[0].model == "A" and rows[0].bt > 1000 > rows[1].bt and rows[0].both_bad == 1


# ---- the store ----------------------------------------------------------------------------------
VOTER_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from lmforge.eval.human.store import Store
    store = Store(sys.argv[1], ["m1", "m2", "m3"])
    print("ready", flush=True)
    while not os.path.exists(sys.argv[1] + ".go"):  # start together with the other voters
        time.sleep(0.005)
    for i in range(int(sys.argv[2])):
        voter = "proc" + sys.argv[3]
        store.vote(store.show("p", "m1", "m2", voter=voter), ["a", "b", "tie"][i % 3], voter)
""")


def test_concurrent_voters_are_all_recorded(tmp_path):
    db = tmp_path / "votes.sqlite"
    store = Store(db, ["m1", "m2", "m3"])
    assert store.journal_mode() == "wal"
    procs = [subprocess.Popen([sys.executable, "-c", VOTER_SCRIPT, str(db), "40", str(k)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(3)]
    errors, go = [], threading.Event()

    def voter(k: int) -> None:
        go.wait()
        try:
            for i in range(25):
                store.vote(store.show("q", "m2", "m3", voter=f"thread{k}"), "both_bad" if i % 2 else "b", f"thread{k}")
                store.rate(store.show("q", "m3", voter=f"thread{k}"), 1 + i % 5, f"thread{k}")
        except Exception as e:  # reported below: an assert in a thread would go unseen
            errors.append(e)

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 3
    Path(str(db) + ".go").touch()
    go.set()
    for t in threads:
        t.join()
    for p in procs:
        assert p.wait(timeout=60) == 0, p.stderr.read()
    assert not errors, errors
    votes = store.votes()
    assert len(votes) == 3 * 40 + 8 * 25
    assert sum(v.model_b == "m2" for v in votes) == 120 and sum(v.winner == "both_bad" for v in votes) == 8 * 12
    assert len(store.scores()) == 8 * 25


def test_store_rejects_bad_votes(tmp_path):
    store = Store(tmp_path / "v.sqlite", ["m1", "m2"])
    token = store.show("p", "m1", "m2", voter="x")
    with pytest.raises(VoteError, match="winner must be one of"):
        store.vote(token, "c", "x")
    with pytest.raises(VoteError, match="unknown or expired token"):
        store.vote("nope", "a", "x")
    with pytest.raises(VoteError, match="unknown or expired token"):  # a rating token cannot carry a pairwise vote
        store.vote(store.show("p", "m1", voter="x"), "a", "x")
    assert store.vote(token, "a", "x") == Vote("m1", "m2", "a")
    with pytest.raises(VoteError, match="already voted") as e:
        store.vote(token, "a", "x")
    assert e.value.status == 409
    # The same database opened by a session with other models: a page showing a model outside them is refused.
    stale = store.show("p", "m1", "m2", voter="x")
    other = Store(tmp_path / "v.sqlite", ["m1", "m3"])
    with pytest.raises(VoteError, match="'m2' is not one of this session's models"):
        other.vote(stale, "a", "x")
    assert other.votes() == []  # the m1-m2 vote is not between this session's models
    for bad in ("0", "6", "x", "", "4.5"):
        with pytest.raises(VoteError, match="from 1 to 5"):
            store.rate(store.show("p", "m1", voter="x"), bad, "x")


def test_tokens_expire_belong_to_their_voter_and_take_one_vote(tmp_path):
    import time

    store = Store(tmp_path / "v.sqlite", ["m1", "m2"], token_ttl_s=0.3)
    token = store.show("p", "m1", "m2", voter="alice")
    with pytest.raises(VoteError, match="shown to another browser") as e:
        store.vote(token, "a", "bob")
    assert e.value.status == 403
    time.sleep(0.4)
    with pytest.raises(VoteError, match=r"this page expired \(0.3 s after it was shown\)"):
        store.vote(token, "a", "alice")
    fresh = store.show("p", "m1", "m2", voter="alice")  # showing a page prunes the expired token
    assert store.tokens() == 1
    assert store.vote(fresh, "b", "alice") == Vote("m1", "m2", "b")
    with pytest.raises(VoteError, match="already voted") as e:
        store.vote(fresh, "a", "alice")
    assert e.value.status == 409 and store.votes() == [Vote("m1", "m2", "b")]


def test_token_table_is_bounded_per_voter_and_in_all(tmp_path):
    store = Store(tmp_path / "v.sqlite", ["m1", "m2"], max_tokens=30, tokens_per_voter=4)
    first = [store.show("p", "m1", "m2", voter="alice") for _ in range(4)]
    later = [store.show("p", "m1", "m2", voter="alice") for _ in range(100)]
    assert store.tokens() == 4  # alice's oldest unused tokens went first
    with pytest.raises(VoteError, match="unknown or expired token"):
        store.vote(first[0], "a", "alice")
    assert store.vote(later[-1], "a", "alice") == Vote("m1", "m2", "a")  # her newest still work
    for i in range(200):  # a new voter (a thrown-away cookie) per page
        store.show("p", "m1", "m2", voter=f"v{i}")
    assert store.tokens() == 30
    with pytest.raises(VoteError, match="unknown or expired token"):  # the table's oldest rows went
        store.vote(later[-2], "a", "alice")
    assert store.vote(store.show("p", "m1", "m2", voter="alice"), "tie", "alice") == Vote("m1", "m2", "tie")


def test_a_database_from_before_voter_binding_opens_and_works(tmp_path):
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:  # the schema before tokens were bound to voters
        conn.executescript("CREATE TABLE shown (token TEXT PRIMARY KEY, kind TEXT NOT NULL, prompt_id TEXT NOT NULL, "
                           "model_a TEXT NOT NULL, model_b TEXT, created REAL NOT NULL, used INTEGER NOT NULL "
                           "DEFAULT 0); INSERT INTO shown VALUES ('old', 'pair', 'p', 'm1', 'm2', 0, 0);")
    store = Store(db, ["m1", "m2"])
    with pytest.raises(VoteError, match="unknown or expired token|expired"):
        store.vote("old", "a", "")
    assert store.vote(store.show("p", "m1", "m2", voter="v"), "a", "v") == Vote("m1", "m2", "a")


# ---- prompts and answers ------------------------------------------------------------------------
def test_read_prompts_formats_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \nfirst\n")
    assert [p.text for p in read_prompts(tmp_path / "p.txt")] == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n\n{"instruction": "Add", "input": "2 and 3"}\n')
    assert [p.text for p in read_prompts(tmp_path / "p.jsonl")] == ["hi", "Add\n\n2 and 3"]
    alpaca = json.loads((ROOT.parent / "shared/data/alpaca_5000.json").read_text())[:3] \
        if (ROOT.parent / "shared/data/alpaca_5000.json").is_file() else \
        [{"instruction": "Sort these", "input": "b, a", "output": "a, b"}, {"instruction": "Say hi", "input": ""}]
    (tmp_path / "p.json").write_text(json.dumps(alpaca))
    got = read_prompts(tmp_path / "p.json")
    assert [(p.instruction, p.input) for p in got] == [(r["instruction"], r["input"]) for r in alpaca]
    assert got[0].id == make_prompt(alpaca[0]["instruction"], alpaca[0]["input"]).id
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_prompts(tmp_path / "missing.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a `prompt`"):
        read_prompts(tmp_path / "bad.jsonl")


def test_answers_generated_once_then_cached(tmp_path, one_thread):
    from lmforge.eval.human.answers import ensure_answers, load_cache

    models = [str(save_tiny(tmp_path / "m1", seed=1)), str(save_tiny(tmp_path / "m2", seed=2))]
    prompts = [make_prompt("Name a color."), make_prompt("Add", "2 and 3")]
    cache = tmp_path / "out" / "answers.jsonl"
    s = Settings(max_new_tokens=6)
    first, generated, reused = ensure_answers(models, prompts, s, cache, device="cpu")
    assert (generated, reused) == (4, 0)
    again, generated, reused = ensure_answers(models, prompts, s, cache, device="cpu")
    assert (generated, reused) == (0, 4) and again == first
    more = prompts + [make_prompt("A new prompt")]
    _, generated, reused = ensure_answers(models, more, s, cache, device="cpu")
    assert (generated, reused) == (2, 4)  # only the new prompt, once per model
    _, generated, _ = ensure_answers(models, prompts, Settings(max_new_tokens=3), cache, device="cpu")
    assert generated == 4  # other settings are other answers
    assert len(cache.read_text().splitlines()) == len(load_cache(cache)) == 10


def test_engine_and_generate_fallback_give_the_same_greedy_answers(tmp_path, one_thread):
    from lmforge.eval.human.answers import generate_answers
    from lmforge.model.load import load_model, load_tokenizer

    path = save_tiny(tmp_path / "m", seed=3)
    model, tok = load_model(path).eval(), load_tokenizer(path)
    prompts = [make_prompt("Hi"), make_prompt("A much longer prompt than the first one"), make_prompt("Ok", "x")]
    for template in ("chat", "none"):
        s = Settings(max_new_tokens=8, template=template)
        engine = generate_answers(model, tok, prompts, s, engine=True)
        assert engine == generate_answers(model, tok, prompts, s, engine=False)
        assert all(engine)
    sampled = Settings(max_new_tokens=8, temperature=1.0, seed=5)
    both = generate_answers(model, tok, prompts, sampled)
    assert generate_answers(model, tok, prompts[1:], sampled) == both[1:]  # a prompt's sample is its own
    assert generate_answers(model, tok, prompts, Settings(max_new_tokens=8, temperature=1.0, seed=6)) != both


# ---- the web app --------------------------------------------------------------------------------
def make_client(tmp_path, store_kw: dict | None = None, **session_kw):
    """A TestClient on the app over a one-prompt, two-model session; `store_kw` and `session_kw` set its limits."""
    from fastapi.testclient import TestClient

    from lmforge.eval.human.app import Session, create_app

    prompt = make_prompt("Say <hello>")
    session = Session(Store(tmp_path / "votes.sqlite", ["m1", "m2"], **(store_kw or {})), ["m1", "m2"], [prompt],
                      {("m1", prompt.id): XSS, ("m2", prompt.id): "plain & simple"}, rounds=50, **session_kw)
    return TestClient(create_app(session), follow_redirects=False)


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def _token(html: str) -> str:
    return html.split('name="token" value="')[1].split('"')[0]


def test_app_escapes_answers_and_forbids_scripts(client):
    r = client.get("/")
    assert r.status_code == 200
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;&lt;b&gt;bold&lt;/b&gt;" in r.text
    assert "<script" not in r.text and "<b>" not in r.text
    assert "Say &lt;hello&gt;" in r.text and "plain &amp; simple" in r.text
    page = r.text.replace(_token(r.text), "")  # the random one-time token may happen to contain "m1"
    assert "m1" not in page and "m2" not in page  # the page does not say which model wrote which answer
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script runs at all
    assert "default-src 'none'" in r.headers["content-security-policy"]


def test_app_bad_votes_get_400(client):
    token = _token(client.get("/").text)
    for body, status, message in [({"token": token, "winner": "c"}, 400, "winner must be one of"),
                                  ({"token": token}, 400, "winner must be one of"),
                                  ({"token": "forged", "winner": "a"}, 400, "unknown or expired token"),
                                  ({"token": token, "winner": "a" * 5000}, 413, "form body over")]:
        r = client.post("/vote", data=body)
        assert r.status_code == status and r.text.startswith(f"error: {message}"), (body, r.text)
        assert r.text.count("\n") == 1
    r = client.post("/vote", data={"token": token, "winner": "tie"})
    assert r.status_code == 303 and r.headers["location"] == "/?done=vote"
    assert client.post("/vote", data={"token": token, "winner": "a"}).status_code == 409
    rate = _token(client.get("/rate").text)
    for score in ("0", "6", "five"):
        r = client.post("/rate", data={"token": rate, "score": score})
        assert r.status_code == 400 and "from 1 to 5" in r.text
    assert client.post("/rate", data={"token": token, "score": "3"}).status_code == 400  # a pair's token
    assert client.post("/rate", data={"token": rate, "score": "3"}).status_code == 303
    csv = client.get("/results.csv").text.splitlines()
    assert csv[0].startswith("rank,model,bt_rating,bt_ci_low,bt_ci_high,elo,votes,wins,ties,losses")
    assert {line.split(",")[6] for line in csv[1:]} == {"1"} and len(csv) == 3


def test_app_expired_and_reused_tokens_are_refused(tmp_path):
    import time

    with make_client(tmp_path, {"token_ttl_s": 0.3}) as c:
        token = _token(c.get("/").text)
        time.sleep(0.4)
        r = c.post("/vote", data={"token": token, "winner": "a"})
        assert r.status_code == 400 and r.text.startswith("error: this page expired")
        token = _token(c.get("/").text)
        assert c.post("/vote", data={"token": token, "winner": "a"}).status_code == 303
        r = c.post("/vote", data={"token": token, "winner": "b"})
        assert r.status_code == 409 and "already voted" in r.text
        other = _token(c.get("/").text)
        c.cookies.clear()  # another browser (no cookie, or another one) cannot use this browser's page
        r = c.post("/vote", data={"token": other, "winner": "a"})
        assert r.status_code == 403 and "another browser" in r.text


def test_votes_are_rate_limited_per_voter_and_per_address(tmp_path):
    with make_client(tmp_path, votes_per_minute=3, address_votes_per_minute=5) as c:
        for _ in range(3):
            assert c.post("/vote", data={"token": _token(c.get("/").text), "winner": "a"}).status_code == 303
        token = _token(c.get("/rate").text)
        r = c.post("/rate", data={"token": token, "score": "4"})  # ratings count too
        assert r.status_code == 429 and r.text.startswith("error: too many votes from this voter: at most 3 a minute")
        assert 1 <= int(r.headers["retry-after"]) <= 60
        c.cookies.clear()  # a new cookie is a new voter, but the same address
        for _ in range(2):
            assert c.post("/vote", data={"token": _token(c.get("/").text), "winner": "b"}).status_code == 303
        r = c.post("/vote", data={"token": _token(c.get("/").text), "winner": "b"})
        assert r.status_code == 429 and "too many votes from address testclient: at most 5 a minute" in r.text
    assert len(Store(tmp_path / "votes.sqlite", ["m1", "m2"]).votes()) == 5  # the refused ones were not recorded


def test_token_table_stays_bounded_under_a_flood_of_page_loads(tmp_path):
    with make_client(tmp_path, {"max_tokens": 40, "tokens_per_voter": 5}) as c:
        first = _token(c.get("/").text)
        for _ in range(150):
            c.get("/rate")
        store = Store(tmp_path / "votes.sqlite", ["m1", "m2"])
        assert store.tokens() == 5  # one browser: its newest 5 pages
        for _ in range(300):
            c.cookies.clear()  # a client that throws its cookie away: a new voter per page
            c.get("/")
        assert store.tokens() == 40
        r = c.post("/vote", data={"token": first, "winner": "a"})
        assert r.status_code == 400 and "unknown or expired token" in r.text
        assert c.post("/vote", data={"token": _token(c.get("/").text), "winner": "a"}).status_code == 303
        assert store.tokens() <= 40


def test_password_guards_every_page_but_health(tmp_path):
    import base64

    def basic(password: str, user: str = "anyone") -> dict:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    with make_client(tmp_path, password="s3cret pässword") as c:
        for path in ("/", "/rate", "/results", "/results.csv"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith('Basic realm="lmforge'), path
            assert r.text == "error: this page needs the password (HTTP Basic auth, any user name)\n"
            assert "default-src 'none'" in r.headers["content-security-policy"]  # refusals get the headers too
        assert c.post("/vote", data={"token": "x", "winner": "a"}).status_code == 401
        assert c.get("/health").status_code == 200
        page = c.get("/", headers=basic("s3cret pässword"))
        assert page.status_code == 200 and "Which answer is better?" in page.text
        r = c.post("/vote", data={"token": _token(page.text), "winner": "a"}, headers=basic("s3cret pässword", ""))
        assert r.status_code == 303
        for bad in (basic("s3cret"), basic("s3cret pässword2"), {"Authorization": "Basic !!!"},
                    {"Authorization": "Bearer s3cret"}):
            assert c.get("/results", headers=bad).status_code == 401, bad
        for _ in range(6):  # 4 wrong so far: the 10th wrong password is the last one checked this minute
            c.get("/", headers=basic("guess"))
        r = c.get("/", headers=basic("s3cret pässword"))  # even the right one waits: guessing gets no faster
        assert r.status_code == 429 and r.text.startswith("error: too many wrong passwords from testclient")
        assert c.get("/health").status_code == 200


def test_secret_on_the_command_line_is_warned_about(monkeypatch, capsys):
    from lmforge.command import warn_if_on_command_line

    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "lmforge", "eval", "human", "--password", "hunter2"])
    assert warn_if_on_command_line(["hunter2"], "the password", "LMFORGE_HUMAN_PASSWORD")
    err = capsys.readouterr().err
    assert err == ("warning: the password on the command line is visible to every user of this machine (ps); use "
                   "LMFORGE_HUMAN_PASSWORD\n")
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "lmforge", "eval", "human", "--models", "a", "b"])
    assert not warn_if_on_command_line(["hunter2"], "the password", "LMFORGE_HUMAN_PASSWORD")
    assert capsys.readouterr().err == ""


# ---- the command --------------------------------------------------------------------------------
def test_cli_bad_inputs_fail_with_one_line(tmp_path, capsys):
    from lmforge.cli import main

    (tmp_path / "p.txt").write_text("hello\n")
    (tmp_path / "empty.txt").write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    model = str(tmp_path / "nowhere")
    cases = [(["--models", "a", "--prompts", str(tmp_path / "p.txt")], "--models needs at least 2 models"),
             (["--models", "a", "a", "--prompts", str(tmp_path / "p.txt")], "--models names the same model twice"),
             (["--models", "a", "b", "--prompts", str(tmp_path / "none.txt")], "--prompts"),
             (["--models", "a", "b", "--prompts", str(tmp_path / "empty.txt")], "no prompts in the file"),
             (["--models", model, "b", "--prompts", str(tmp_path / "p.txt")], f"no such model: {model}"),
             (["--models", str(broken), str(broken) + "/", "--prompts", str(tmp_path / "p.txt"), "--device", "cpu",
               "--out", str(tmp_path / "out")], f"cannot load model {broken}")]
    for args, message in cases:
        assert main(["eval", "human", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (args, err)


@pytest.mark.slow
def test_command_takes_the_password_from_the_environment_and_never_writes_it(tmp_path):
    """LMFORGE_HUMAN_PASSWORD guards the pages; it is not in config.yaml, the output, or a warning about `ps`."""
    import base64

    import httpx
    import yaml

    password = "correct horse battery staple"
    models = [str(save_tiny(tmp_path / m, seed=k)) for k, m in enumerate(("m1", "m2"))]
    prompt = make_prompt("Say hi.")
    (tmp_path / "prompts.txt").write_text(prompt.instruction + "\n")
    out = tmp_path / "out"
    out.mkdir()
    settings = json.loads(Settings(max_new_tokens=8).key())
    (out / "answers.jsonl").write_text("".join(json.dumps({"model": m, "prompt_id": prompt.id, "settings": settings,
                                                           "prompt": prompt.text, "answer": f"hi from {m}"}) + "\n"
                                               for m in models))  # cached: nothing to generate
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "eval", "human", "--models", *models, "--prompts",
                             str(tmp_path / "prompts.txt"), "--out", str(out), "--port", str(port),
                             "--max-new-tokens", "8", "--device", "cpu"], cwd=ROOT,
                            env={**os.environ, "LMFORGE_HUMAN_PASSWORD": password}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(proc, url, 120, "lmforge eval human")  # /health needs no password
        with httpx.Client(trust_env=False) as client:
            assert client.get(url + "/").status_code == 401
            auth = {"Authorization": "Basic " + base64.b64encode(f"me:{password}".encode()).decode()}
            page = client.get(url + "/", headers=auth)
            assert page.status_code == 200 and "hi from" in page.text
    finally:
        log = stop_server(proc)
    config = (out / "config.yaml").read_text()
    assert yaml.safe_load(config)["password"] is None and password not in config
    assert password not in log and "warning:" not in log, log
    assert "password required (HTTP Basic auth); Ctrl-C stops" in log and "answers: 0 generated, 2 reused" in log


def _browser():
    """Headless Chromium through chromedriver; skipped without one, except under CI (where .ci/run installs it)."""
    require("selenium", why="the dev extra installs it")
    driver = require("chromedriver", binary=True, why="Debian's chromium + chromium-driver (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_vote_in_headless_chromium(tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    m1, m2 = str(save_tiny(tmp_path / "m1", seed=1)), str(save_tiny(tmp_path / "m2", seed=2))
    prompt = make_prompt("Write some HTML.")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": prompt.instruction}) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    settings = json.loads(Settings(max_new_tokens=8).key())  # the command's defaults, and --max-new-tokens 8
    (out / "answers.jsonl").write_text(json.dumps({"model": m1, "prompt_id": prompt.id, "settings": settings,
                                                   "prompt": prompt.text, "answer": XSS}) + "\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "eval", "human", "--models", m1, m2, "--prompts",
                             str(tmp_path / "prompts.jsonl"), "--out", str(out), "--port", str(port),
                             "--max-new-tokens", "8", "--device", "cpu"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(proc, url, 120, "lmforge eval human")
        browser.get(url + "/results")
        assert browser.find_element(By.ID, "totals").text.startswith("0 pairwise votes")

        browser.get(url + "/")
        answers = {k: browser.find_element(By.ID, f"answer-{k}").text for k in "ab"}
        assert XSS in answers.values()  # the markup is shown as text ...
        assert browser.execute_script("return typeof window.pwned") == "undefined"  # ... and never ran
        assert browser.find_elements(By.CSS_SELECTOR, "main script, main b") == []
        winner = m1 if answers["a"] == XSS else m2  # m1 wrote the seeded answer
        browser.find_element(By.ID, "vote-a").click()  # returns before the next page has loaded: wait for it
        flash = WebDriverWait(browser, 10).until(expected_conditions.presence_of_element_located((By.ID, "flash")))
        assert flash.text == "Vote recorded. Here is the next pair."

        browser.get(url + "/rate")
        rated = m1 if browser.find_element(By.ID, "answer").text == XSS else m2
        browser.find_element(By.ID, "rate-5").click()
        flash = WebDriverWait(browser, 10).until(expected_conditions.presence_of_element_located((By.ID, "flash")))
        assert flash.text == "Rating recorded. Here is the next answer."

        browser.get(url + "/results")
        assert browser.find_element(By.ID, "totals").text == "1 pairwise vote, 1 rating (1-5)."
        rows = {r.find_elements(By.TAG_NAME, "td")[1].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in browser.find_elements(By.CSS_SELECTOR, "#leaderboard tbody tr")}
        loser = m2 if winner == m1 else m1
        assert rows[winner][0] == "1" and rows[winner][4:7] == ["1002.0", "1", "1 / 0 / 0"]
        assert rows[loser][4:7] == ["998.0", "1", "0 / 0 / 1"]
        assert rows[rated][8] == "5.00 (1)"
        assert browser.find_element(By.ID, "bt-note").is_displayed()  # one vote: Bradley-Terry not identified yet

        csv = httpx.get(url + "/results.csv", trust_env=False).text.splitlines()
        assert csv[1].split(",")[1:2] == [winner] and ",1002.00,1,1,0,0,0," in csv[1]
    finally:
        browser.quit()
        log = stop_server(proc)
    assert "answers: 1 generated, 1 reused (1 prompts x 2 models)" in log, log
