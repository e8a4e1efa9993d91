"""Per-document scores and their aggregation: values, standard errors and group means, as lm-eval computes them.

lm-eval's standard errors are the closed form for a mean and a bootstrap for the aggregations it lists as
bootstrappable (median, perplexity, F1, Matthews correlation). The bootstrap here draws exactly lm-eval's
resamples (chunks of 1,000 draws, chunk i from random.Random(i), `choices` with replacement), so its stderr
equals lm-eval's to the last digit; the draws are replayed through numpy with the same Mersenne Twister state,
which makes 100,000 resamples take seconds instead of minutes.
"""
from __future__ import annotations

import math
import random
import re
import string

import numpy as np

# A metric's aggregation when its metric_list entry names none (lm-eval's registry).
DEFAULT_AGGREGATION = {"perplexity": "perplexity", "word_perplexity": "weighted_perplexity",
                       "byte_perplexity": "weighted_perplexity", "bits_per_byte": "bits_per_byte", "f1": "f1",
                       "mcc": "matthews_corrcoef"}
BOOTSTRAPPED = {"median", "perplexity", "f1", "matthews_corrcoef"}
BOOTSTRAP_ITERS = 100_000  # lm-eval's default --bootstrap_iters


def exact_match(prediction: str, reference: str, regexes_to_ignore=None, ignore_case: bool = False,
                ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """lm-eval's exact_match (HF evaluate's): strip the regexes, optionally case, punctuation and digits."""
    for rx in regexes_to_ignore or []:
        prediction, reference = re.sub(rx, "", prediction), re.sub(rx, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for on, chars in ((ignore_punctuation, string.punctuation), (ignore_numbers, string.digits)):
        if on:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def sample_stddev(values) -> float:
    mu = sum(values) / len(values)
    return math.sqrt(sum((x - mu) ** 2 for x in values) / (len(values) - 1))


def mean_stderr(values: list[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation (lm-eval's mean_stderr)."""
    return sample_stddev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def f1(pairs) -> float:
    """Binary F1 of (gold, prediction) pairs with class 1 positive (sklearn's default, which lm-eval calls)."""
    gold, pred = np.asarray([p[0] for p in pairs]), np.asarray([p[1] for p in pairs])
    tp = float(np.sum((gold == 1) & (pred == 1)))
    denom = float(np.sum(gold == 1) + np.sum(pred == 1))
    return 2 * tp / denom if denom else 0.0


def matthews_corrcoef(pairs) -> float:
    """Matthews correlation of (gold, prediction) pairs, multiclass (sklearn's formula, which lm-eval calls)."""
    labels = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    index = {label: i for i, label in enumerate(labels)}
    c = np.zeros((len(labels), len(labels)))
    for g, p in pairs:
        c[index[g], index[p]] += 1
    t, p, n = c.sum(1), c.sum(0), c.sum()
    cov_ytyp = np.trace(c) * n - t @ p
    cov_ypyp, cov_ytyt = n * n - p @ p, n * n - t @ t
    return 0.0 if cov_ypyp * cov_ytyt == 0 else float(cov_ytyp / math.sqrt(cov_ytyt * cov_ypyp))


def _weighted_mean(pairs) -> float:
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs)


AGGREGATIONS = {
    "mean": lambda xs: sum(xs) / len(xs),
    "median": lambda xs: sorted(xs)[len(xs) // 2],
    "perplexity": lambda xs: math.exp(-sum(xs) / len(xs)),
    "weighted_perplexity": lambda xs: math.exp(-_weighted_mean(xs)),
    "bits_per_byte": lambda xs: -_weighted_mean(xs) / math.log(2),
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
}


def _draws(n: int, iters: int):
    """lm-eval's bootstrap resamples as index arrays: chunk i is `random.Random(i).choices(range(n), k=n)`
    repeated min(1000, iters) times."""
    chunk = min(1000, iters)
    for i in range(iters // chunk):
        mt = random.Random(i).getstate()[1]
        rs = np.random.RandomState()
        rs.set_state(("MT19937", np.asarray(mt[:-1], dtype=np.uint32), mt[-1]))
        yield np.floor(rs.random_sample((chunk, n)) * n).astype(np.int64)


def bootstrap_stderr(aggregation: str, values: list, iters: int) -> float:
    """The standard deviation of the aggregation over lm-eval's bootstrap resamples of the per-document values."""
    res: list[float] = []
    if aggregation in ("perplexity", "median"):
        x = np.asarray(values, dtype=np.float64)
        for idx in _draws(len(values), iters):
            s = x[idx]
            res += (np.exp(-s.sum(1) / len(values)) if aggregation == "perplexity"
                    else np.sort(s, 1)[:, len(values) // 2]).tolist()
    else:
        fn = AGGREGATIONS[aggregation]
        for idx in _draws(len(values), iters):
            res += [fn([values[j] for j in row]) for row in idx.tolist()]
    return sample_stddev(res)


def aggregate(aggregation: str, values: list, bootstrap_iters: int = BOOTSTRAP_ITERS) -> tuple[float, float | None]:
    """(value, stderr): the mean's closed-form stderr, a bootstrap for lm-eval's bootstrappable aggregations, else
    None (weighted perplexities, bits per byte)."""
    value = AGGREGATIONS[aggregation](values)
    if len(values) < 2 or bootstrap_iters <= 0:
        return value, None
    if aggregation == "mean":
        return value, mean_stderr([float(v) for v in values])
    if aggregation in BOOTSTRAPPED:
        return value, bootstrap_stderr(aggregation, values, bootstrap_iters)
    return value, None


def weighted_mean(values: list[float], sizes: list[int], weight_by_size: bool = True) -> float:
    """A group's score from its tasks' scores (lm-eval's aggregate_subtask_metrics)."""
    sizes = sizes if weight_by_size else [1] * len(sizes)
    return sum(v * s for v, s in zip(values, sizes)) / sum(sizes)


def group_stderr(stderrs: list[float], sizes: list[int], weight_by_size: bool = True) -> float | None:
    """A group score's stderr: the pooled sample stderr for a size-weighted mean, else that of the plain mean of
    independent task means (lm-eval's pooled_sample_stderr / unweighted_mean_stderr)."""
    if not weight_by_size:
        return math.sqrt(sum(s ** 2 for s in stderrs)) / len(stderrs)
    if sum(sizes) <= len(sizes):
        return None
    var = sum((n - 1) * s ** 2 * n for n, s in zip(sizes, stderrs)) / (sum(sizes) - len(sizes))
    return math.sqrt(var / sum(sizes))
