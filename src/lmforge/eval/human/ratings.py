"""Ratings from pairwise votes, computed the way Chatbot Arena does (fastchat/serve/monitor/elo_analysis.py).

`elo` is Arena's `compute_elo`: online updates in vote order. `bradley_terry` is its `compute_mle_elo`:
a logistic regression without intercept whose rows are +ln(base) for the first model and -ln(base) for
the second, a tie counting as half a win for each side, ratings = scale * coefficient + init with the
coefficients summing to zero. Arena fits it with scikit-learn's lbfgs; here Newton's method with a
line search finds the same maximum. `bootstrap` resamples the votes with replacement and takes the
2.5th and 97.5th percentiles of the refitted ratings, as Arena's confidence intervals do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# The first model's score for each outcome; "both bad" is a tie, as Arena's "tie (bothbad)".
SCORE = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}
# A ridge this small moves ratings by far less than 0.01 when the maximum-likelihood estimate exists, and
# keeps them finite when it does not (a model that has won, or lost, every one of its votes).
RIDGE = 1e-6


@dataclass(frozen=True)
class Vote:
    """One pairwise vote: model_a was shown as Answer 1, model_b as Answer 2; winner is a, b, tie or both_bad."""
    model_a: str
    model_b: str
    winner: str


@dataclass
class Row:
    """One leaderboard line."""
    model: str
    bt: float | None  # None (with its interval) until the Bradley–Terry maximum exists: see `identified`
    bt_low: float | None
    bt_high: float | None
    elo: float
    votes: int
    wins: int
    ties: int
    losses: int
    both_bad: int
    score_mean: float | None
    score_n: int


def elo(votes: list[Vote], k: float = 4, base: float = 10, scale: float = 400, init: float = 1000) -> dict[str, float]:
    """Online Elo over the votes in order; ties and "both bad" score 0.5 for each side."""
    rating: dict[str, float] = {}
    for v in votes:
        ra, rb = rating.setdefault(v.model_a, init), rating.setdefault(v.model_b, init)
        ea = 1 / (1 + base ** ((rb - ra) / scale))
        sa = SCORE[v.winner]
        rating[v.model_a] = ra + k * (sa - ea)
        rating[v.model_b] = rb + k * ((1 - sa) - (1 - ea))
    return rating


def _models(votes: list[Vote], models: list[str] | None) -> list[str]:
    names = list(models or [])
    for v in votes:
        for m in (v.model_a, v.model_b):
            if m not in names:
                names.append(m)
    return names


def _encode(votes: list[Vote], names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {m: i for i, m in enumerate(names)}
    a = np.array([index[v.model_a] for v in votes], dtype=np.int64)
    b = np.array([index[v.model_b] for v in votes], dtype=np.int64)
    s = np.array([SCORE[v.winner] for v in votes], dtype=np.float64)
    return a, b, s


def _wins(a: np.ndarray, b: np.ndarray, s: np.ndarray, p: int) -> np.ndarray:
    """wins[i, j]: how often i beat j, a tie adding 0.5 to both directions."""
    w = np.zeros((p, p))
    np.add.at(w, (a, b), s)
    np.add.at(w, (b, a), 1 - s)
    return w


def _fit(wins: np.ndarray, base: float, start: np.ndarray | None = None) -> np.ndarray:
    """Coefficients beta maximising sum_ij wins[i,j] * log sigmoid(ln(base) * (beta_i - beta_j)) - RIDGE/2 |beta|^2.

    The likelihood does not change when every beta moves by the same amount and its gradient sums to
    zero, so (like lbfgs started at zero) the solution has coefficients summing to zero.
    """
    p = len(wins)
    c = math.log(base)
    n = wins + wins.T
    beta = np.zeros(p) if start is None else start - start.mean()

    def loss(x: np.ndarray) -> float:
        z = c * (x[:, None] - x[None, :])
        return float((wins * np.logaddexp(0, -z)).sum() + RIDGE / 2 * x @ x)

    current = loss(beta)
    for _ in range(200):
        z = c * (beta[:, None] - beta[None, :])
        sig = 0.5 * (1 + np.tanh(z / 2))  # the logistic function, without overflow
        grad = -c * (wins - n * sig).sum(axis=1) + RIDGE * beta
        if np.abs(grad).max() < 1e-10 * max(1.0, n.sum()):
            break
        curv = n * sig * (1 - sig)
        hess = c * c * (np.diag(curv.sum(axis=1)) - curv) + RIDGE * np.eye(p)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while True:  # backtracking: Newton's full step can overshoot far from the optimum
            trial = beta - t * step
            new = loss(trial)
            if new <= current - 1e-4 * t * (grad @ step):
                break
            t /= 2
            if t < 1e-12:  # no decrease left at float precision: this is the optimum
                return beta
        beta, current = trial, new
    return beta


def bradley_terry(votes: list[Vote], models: list[str] | None = None, base: float = 10, scale: float = 400,
                  init: float = 1000) -> dict[str, float]:
    """Bradley–Terry maximum-likelihood ratings (Arena's compute_mle_elo); `models` adds models without votes."""
    names = _models(votes, models)
    if not names:
        return {}
    beta = _fit(_wins(*_encode(votes, names), len(names)), base)
    return {m: float(scale * b + init) for m, b in zip(names, beta)}


def bootstrap(votes: list[Vote], models: list[str] | None = None, rounds: int = 1000, seed: int = 0,
              base: float = 10, scale: float = 400, init: float = 1000) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of the Bradley–Terry ratings over `rounds` resamplings of the votes."""
    names = _models(votes, models)
    if not votes:
        return {m: (init, init) for m in names}
    a, b, s = _encode(votes, names)
    start = _fit(_wins(a, b, s, len(names)), base)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(names)))
    for r in range(rounds):
        idx = rng.integers(0, len(votes), len(votes))
        samples[r] = scale * _fit(_wins(a[idx], b[idx], s[idx], len(names)), base, start) + init
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    return {m: (float(lo), float(hi)) for m, lo, hi in zip(names, low, high)}


def identified(votes: list[Vote], models: list[str] | None = None) -> bool:
    """Whether the Bradley–Terry maximum exists: every model reaches every other through wins (ties both ways).

    Otherwise some group of models has only won (or only lost) against the rest, and its ratings are
    held finite only by the ridge.
    """
    names = _models(votes, models)
    if len(names) < 2:
        return True
    w = _wins(*_encode(votes, names), len(names)) > 0

    def reach(adj: np.ndarray) -> int:
        seen, todo = {0}, [0]
        while todo:
            i = todo.pop()
            for j in np.flatnonzero(adj[i]):
                if int(j) not in seen:
                    seen.add(int(j))
                    todo.append(int(j))
        return len(seen)

    return reach(w) == len(names) and reach(w.T) == len(names)


def leaderboard(votes: list[Vote], scores: list[tuple[str, int]], models: list[str], rounds: int = 1000,
                seed: int = 0) -> list[Row]:
    """One row per model, best first: ratings, intervals, vote counts, mean 1–5 score.

    Ranked by Bradley–Terry rating, or by Elo while the Bradley–Terry maximum does not exist yet
    (then its ratings would be set by the ridge alone, and are left out).
    """
    fitted = identified(votes, models)
    bt = bradley_terry(votes, models) if fitted else {}
    ci = bootstrap(votes, models, rounds=rounds, seed=seed) if fitted else {}
    el = elo(votes)
    rows = []
    for m in models:
        mine = [v for v in votes if m in (v.model_a, v.model_b)]
        wins = sum(v.winner == ("a" if v.model_a == m else "b") for v in mine)
        losses = sum(v.winner == ("b" if v.model_a == m else "a") for v in mine)
        given = [s for name, s in scores if name == m]
        low, high = ci.get(m, (None, None))
        rows.append(Row(m, bt.get(m), low, high, el.get(m, 1000.0), len(mine), wins, len(mine) - wins - losses,
                        losses, sum(v.winner == "both_bad" for v in mine),
                        sum(given) / len(given) if given else None, len(given)))
    return sorted(rows, key=lambda r: (-(r.bt if r.bt is not None else r.elo), -r.elo, r.model))
