"""`lmforge eval tasks` and `lmforge eval compare`: run lm-eval-format tasks on a model, and compare two runs.

Each task's requests go to the model in one call (the model batches them and shares contexts), then
every document is scored with lm-eval's definitions and the per-document scores are aggregated into
the mean and its standard error.
"""
from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

from lmforge.eval import tasks as T

PERPLEXITY_METRICS = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}


def n_docs(total: int, limit: float | None) -> int:
    """lm-eval's --limit: a count, or a fraction of the documents when below 1."""
    if limit is None:
        return total
    if limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    return min(total, int(math.ceil(total * limit)) if limit < 1 else int(limit))


def run_task(model, task: T.Task, limit: float | None = None, num_fewshot: int | None = None) -> dict:
    """Score one task: {"n_samples", "num_fewshot", metric: value, metric_stderr: value, ...}."""
    docs = task.docs[: n_docs(len(task.docs), limit)]
    if not docs:
        raise T.TaskError(f"task {task.name}: no documents to evaluate")
    shots = int(task.get("num_fewshot", 0) if num_fewshot is None else num_fewshot)
    sampler = T.FewshotSampler(task)
    if task.output_type == "loglikelihood_rolling":
        per_doc = _rolling(model, task, docs)
    else:
        contexts = [T.context(task, d, sampler.sample(shots, d)) for d in docs]
        per_doc = {"multiple_choice": _multiple_choice, "loglikelihood": _loglikelihood,
                   "generate_until": _generate}[task.output_type](model, task, docs, contexts)
    out: dict = {"n_samples": len(docs), "num_fewshot": shots}
    for key, values in per_doc.items():
        out.update(_aggregate(key, values))
    return out


def _aggregate(key: str, values: list) -> dict:
    """Mean and standard error, or lm-eval's corpus-level perplexities for (loglikelihood, weight) items."""
    metric, _, filt = key.partition(",")
    suffix = f",{filt}" if filt else ""
    if metric == "perplexity":
        return {key: math.exp(-sum(values) / len(values))}
    if metric in PERPLEXITY_METRICS:
        ll, weight = sum(v[0] for v in values), sum(v[1] for v in values)
        value = -ll / weight / math.log(2) if metric == "bits_per_byte" else math.exp(-ll / weight)
        return {key: value}
    values = [float(v) for v in values]
    return {key: sum(values) / len(values), f"{metric}_stderr{suffix}": T.mean_stderr(values)}


def _argmax(xs: list[float]) -> int:
    """Index of the first maximum, as np.argmax."""
    return max(range(len(xs)), key=xs.__getitem__)


def _gold(task: T.Task, doc: dict, choices: list[str]):
    """The gold choice index (or indices) in `choices`; -100 where lm-eval would find none."""
    gold = T.doc_to_target(task, doc)
    if isinstance(gold, list):
        return [g if isinstance(g, int) and g < len(choices) else -100 for g in gold]
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return gold if gold < len(choices) else -100


def _multiple_choice(model, task, docs, contexts) -> dict[str, list]:
    wanted = [e["metric"] for e in task.metrics()]
    delim = task.get("target_delimiter", " ")
    requests, spans = [], []
    for doc, ctx in zip(docs, contexts):
        choices = T.doc_to_choice(task, doc)
        if not choices:
            raise T.TaskError(f"task {task.name}: a document has no choices: {str(doc)[:120]}")
        start = len(requests)
        requests += [model.encode_pair(ctx, f"{delim}{c}") for c in choices]
        if "acc_mutual_info" in wanted:
            requests += [model.encode_pair("", f"{delim}{c}") for c in choices]
        spans.append((start, len(requests), choices))
    results = model.loglikelihood(requests)
    per_doc: dict[str, list] = {}
    for doc, (a, b, choices) in zip(docs, spans):
        if callable(task.cfg.get("process_results")):
            for k, v in task.cfg["process_results"](doc, results[a:b]).items():
                per_doc.setdefault(k, []).append(v)
            continue
        lls = [r[0] for r in results[a: a + len(choices)]]
        greedy = [r[1] for r in results[a: a + len(choices)]]
        gold = _gold(task, doc, choices)
        golds = gold if isinstance(gold, list) else [gold]
        scores = {
            "acc": _argmax(lls) in golds,
            "acc_norm": _argmax([ll / len(c) for ll, c in zip(lls, choices)]) in golds,
            "acc_bytes": _argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]) in golds,
            "exact_match": any(greedy[g] for g in golds if g != -100),
        }
        if "acc_mutual_info" in wanted:
            uncond = [r[0] for r in results[a + len(choices): b]]
            scores["acc_mutual_info"] = _argmax([c - u for c, u in zip(lls, uncond)]) in golds
        for m in wanted:
            per_doc.setdefault(m, []).append(float(scores[m]))
    return per_doc


def _loglikelihood(model, task, docs, contexts) -> dict[str, list]:
    results = model.loglikelihood([model.encode_pair(c, T.doc_to_target(task, d)) for d, c in zip(docs, contexts)])
    per_doc: dict[str, list] = {}
    for m in (e["metric"] for e in task.metrics()):
        per_doc[m] = [r[0] if m == "perplexity" else float(r[1]) for r in results]
    return per_doc


def _rolling(model, task, docs) -> dict[str, list]:
    """Each document's rolling-window log-likelihood, weighted by its words or bytes (lm-eval's definitions)."""
    texts = [T.doc_to_target(task, d) for d in docs]
    lls = [ll for ll, _ in model.loglikelihood_rolling(texts)]
    per_doc: dict[str, list] = {}
    for m in (e["metric"] for e in task.metrics()):
        weight = (lambda t: len(re.split(r"\s+", t))) if m == "word_perplexity" else \
            (lambda t: len(t.encode("utf-8")))
        per_doc[m] = [(ll, weight(t)) for ll, t in zip(lls, texts)]
    return per_doc


def _generate(model, task, docs, contexts) -> dict[str, list]:
    gen = dict(task.get("generation_kwargs", {}))
    until = gen.get("until", [task.get("fewshot_delimiter", "\n\n")])
    until = [until] if isinstance(until, str) else list(until)
    outputs = model.generate_until(contexts, until, int(gen.get("max_gen_toks", 256)))
    filters = task.get("filter_list") or [{"name": "none", "filter": [{"function": "take_first"}]}]
    per_doc: dict[str, list] = {}
    for f in filters:
        results = T.build_filter(task, f.get("filter", []))([[o] for o in outputs], docs)
        suffix = "" if f.get("name", "none") == "none" else f",{f['name']}"
        for doc, result in zip(docs, results):
            if callable(task.cfg.get("process_results")):
                scores = task.cfg["process_results"](doc, [result])
            else:
                scores = _generation_scores(task, doc, result)
            for k, v in scores.items():
                per_doc.setdefault(k + suffix, []).append(v)
    return per_doc


def _generation_scores(task: T.Task, doc: dict, result) -> dict[str, float]:
    gold = T.doc_to_target(task, doc)
    if task.cfg.get("doc_to_choice") is not None:
        gold = T.doc_to_choice(task, doc)[gold]
    golds = gold if isinstance(gold, list) else [gold]
    if not isinstance(result, list):
        golds = [type(result)(g) if type(g) is not type(result) else g for g in golds]
    scores: dict[str, float] = {}
    for entry in task.metrics():
        metric, kwargs = entry["metric"], T.metric_kwargs(entry)
        if metric == "exact_match":
            scores["exact_match"] = float(any(T.exact_match(result, g, **kwargs) for g in golds))
        else:  # a !function metric, called the way lm-eval calls it
            value = metric(references=[gold], predictions=[result], **kwargs)
            scores.update(value if isinstance(value, dict) else {metric.__name__: value})
    return scores


def load_tasks(specs: list[str], data_dir: Path | None = None) -> list[T.Task]:
    """Every task definition and its data, checked before a model is loaded."""
    return [T.load_task(s, data_dir) for s in specs]


def evaluate(model, tasks: list[T.Task], *, limit: float | None = None, num_fewshot: int | None = None,
             log=print) -> dict[str, dict]:
    """Run every task; {task name: results}."""
    results = {}
    for task in tasks:
        t0 = time.perf_counter()
        results[task.name] = run_task(model, task, limit, num_fewshot)
        results[task.name]["seconds"] = round(time.perf_counter() - t0, 2)
        log(f"{task.name}: {results[task.name]['n_samples']} documents in {results[task.name]['seconds']:.1f} s")
    return results


def metric_rows(results: dict[str, dict]) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr) for every metric in a results mapping."""
    rows = []
    for task, r in results.items():
        for key, value in r.items():
            metric, _, filt = key.partition(",")
            if key in ("n_samples", "num_fewshot", "seconds", "alias") or metric.endswith("_stderr") \
                    or not isinstance(value, (int, float)):
                continue
            stderr = r.get(f"{metric}_stderr" + (f",{filt}" if filt else ""))
            rows.append((task, key, float(value), stderr if isinstance(stderr, (int, float)) else None))
    return rows


def table(results: dict[str, dict]) -> str:
    """lm-eval's console table: task, documents, shots, metric, value ± stderr."""
    lines = ["| Task | n | Shots | Metric | Value | Stderr |", "|---|---:|---:|---|---:|---:|"]
    for task, metric, value, stderr in metric_rows(results):
        r = results[task]
        se = "" if stderr is None else f"± {stderr:.4f}"
        lines.append(f"| {task} | {r.get('n_samples', '')} | {r.get('num_fewshot', '')} | {metric} | "
                     f"{value:.4f} | {se} |")
    return "\n".join(lines)


def read_results(path: str | Path) -> dict[str, dict]:
    """Task results from an `lmforge eval tasks --out` file or an lm-eval results JSON (its `,none` keys dropped).

    A directory stands for the one results file inside it."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.json") if p.name.startswith(("results", "eval")))
        if len(found) != 1:
            raise ValueError(f"{path}: expected one results JSON inside, found {len(found)}"
                             + (f" ({', '.join(str(p) for p in found[:4])})" if found else ""))
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise ValueError(f"{path}: no `results` mapping (write one with `lmforge eval tasks --out`)")
    return {task: {k.removesuffix(",none"): v for k, v in r.items()} for task, r in results.items()
            if isinstance(r, dict)}


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[dict]:
    """Per shared (task, metric): A, B, B - A, the difference's standard error and z (independent samples)."""
    rows_b = {(t, m): (v, s) for t, m, v, s in metric_rows(b)}
    out = []
    for task, metric, va, sa in metric_rows(a):
        if (task, metric) not in rows_b:
            continue
        vb, sb = rows_b[(task, metric)]
        se = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
        delta = vb - va
        out.append({"task": task, "metric": metric, "a": va, "b": vb, "delta": delta, "stderr": se,
                    "z": delta / se if se else None})
    return out


def compare_table(rows: list[dict], name_a: str, name_b: str) -> str:
    lines = ["| Task | Metric | A | B | B - A | Stderr | z |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        se = "" if r["stderr"] is None else f"{r['stderr']:.4f}"
        z = "" if r["z"] is None else f"{r['z']:+.2f}" + (" *" if abs(r["z"]) >= 1.96 else "")
        lines.append(f"| {r['task']} | {r['metric']} | {r['a']:.4f} | {r['b']:.4f} | {r['delta']:+.4f} | {se} | {z} |")
    return "\n".join([f"A: {name_a}", f"B: {name_b}", *lines,
                      "* |z| >= 1.96: the difference is outside the 95 % interval of the noise"])
