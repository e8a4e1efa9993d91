"""`lmforge eval tasks` and `lmforge eval compare`: run lm-eval-format tasks and groups on a model, and compare runs.

Each task's requests go to the model in one call (the model batches them and shares contexts), then
every document is scored with lm-eval's definitions (its process_results), each filter's per-document
scores are aggregated into the value and its standard error (closed form or lm-eval's bootstrap), and
groups aggregate their tasks. With `samples`, every document's record is kept in the shape of
lm-eval's --log_samples JSONL.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.errors import UserError
from lmforge.eval import groups as G
from lmforge.eval import metrics as M
from lmforge.eval import tasks as T


@dataclass
class Settings:
    """How prompts are built and scores aggregated: lm-eval's --system_instruction, --apply_chat_template,
    --fewshot_as_multiturn, --bootstrap_iters and --seed."""
    system_instruction: str | None = None
    chat: Callable | None = None  # the model's chat template: chat(messages, add_generation_prompt=...)
    multiturn: bool = False
    bootstrap_iters: int = M.BOOTSTRAP_ITERS
    seed: int = 1234  # sampled generations: document i's samples use seed + i


def n_docs(total: int, limit: float | None) -> int:
    """lm-eval's --limit: a count, or a fraction of the documents when below 1."""
    if limit is None:
        return total
    if limit <= 0:
        raise T.TaskError(f"--limit must be positive, got {limit}")
    return min(total, int(math.ceil(total * limit)) if limit < 1 else int(limit))


@dataclass
class _Doc:
    """One document's requests, raw responses, and per filter its filtered responses and scores."""
    doc: dict
    arguments: list
    resps: list
    scored: dict  # filter name -> (filtered responses, {metric: value})


def run_task(model, task: T.Task, limit: float | None = None, num_fewshot: int | None = None,
             settings: Settings | None = None, samples: list | None = None) -> dict:
    """Score one task: {"n_samples", "num_fewshot", metric: value, metric_stderr: value, ...}; with `samples`, its
    per-document records (lm-eval's --log_samples fields) are appended to it."""
    settings = settings or Settings()
    docs = task.docs[: n_docs(len(task.docs), limit)]
    if not docs:
        raise T.TaskError(f"task {task.name}: no documents to evaluate")
    shots = int(task.get("num_fewshot", 0) if num_fewshot is None else num_fewshot)
    sampler = T.FewshotSampler(task)
    if task.output_type == "loglikelihood_rolling":
        records = _rolling(model, task, docs)
    else:
        contexts = [T.context(task, d, sampler.sample(shots, d), settings.system_instruction, settings.chat,
                              settings.multiturn) for d in docs]
        run = {"multiple_choice": _multiple_choice, "loglikelihood": _loglikelihood,
               "generate_until": _generate}[task.output_type]
        records = run(model, task, docs, contexts, settings)
    out: dict = {"n_samples": len(docs), "num_fewshot": shots}
    aggregation = {e["metric"] if isinstance(e["metric"], str) else None: e.get("aggregation")
                   for e in task.metrics()}
    per_key: dict[str, list] = {}
    for r in records:
        for filt, (_, scores) in r.scored.items():
            for metric, value in scores.items():
                per_key.setdefault(metric if filt == "none" else f"{metric},{filt}", []).append(value)
    for key, values in per_key.items():
        metric, _, filt = key.partition(",")
        how = aggregation.get(metric) or M.DEFAULT_AGGREGATION.get(metric, "mean")
        value, stderr = M.aggregate(how, values, settings.bootstrap_iters)
        out[key] = value
        if how == "mean" or how in M.BOOTSTRAPPED:
            out[f"{metric}_stderr" + (f",{filt}" if filt else "")] = stderr
    if samples is not None:
        samples += _log_records(task, records)
    return out


def _argmax(xs: list[float]) -> int:
    """Index of the first maximum, as np.argmax."""
    return max(range(len(xs)), key=xs.__getitem__)


def _gold(task: T.Task, doc: dict, choices: list[str]):
    """The gold choice index (or indices) in `choices`; -100 where lm-eval would find none."""
    gold = T.doc_to_text(task, doc) if task.multiple_input else T.doc_to_target(task, doc)
    if isinstance(gold, list):
        return [g if isinstance(g, int) and g < len(choices) else -100 for g in gold]
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    return gold if gold < len(choices) else -100


def _multiple_choice(model, task, docs, contexts, settings) -> list[_Doc]:
    wanted = [e["metric"] for e in task.metrics()]
    delim = T.continuation_delimiter(task, settings.chat is not None)
    arguments = []
    for doc, ctx in zip(docs, contexts):
        choices = T.doc_to_choice(task, doc)
        if not choices:
            raise T.TaskError(f"task {task.name}: a document has no choices: {str(doc)[:120]}")
        if task.multiple_input:  # one context per choice, all continued by the same target
            args = [(c, f"{delim}{T.doc_to_target(task, doc)}") for c in ctx]
        else:
            args = [(ctx, f"{delim}{c}") for c in choices]
        if "acc_mutual_info" in wanted:
            args += [("", f"{delim}{c}") for c in choices]
        arguments.append(args)
    flat = model.loglikelihood([model.encode_pair(c, x) for args in arguments for c, x in args])
    records, at = [], 0
    for doc, args in zip(docs, arguments):
        results = flat[at: at + len(args)]
        at += len(args)
        if callable(task.cfg.get("process_results")):
            scores = task.cfg["process_results"](doc, results)
        else:
            scores = _choice_scores(task, doc, results, wanted)
        records.append(_Doc(doc, args, [[r] for r in results], {"none": (results, scores)}))
    return records


def _choice_scores(task, doc, results, wanted) -> dict:
    """lm-eval's multiple-choice process_results: acc, acc_norm (by characters), acc_bytes, exact_match,
    acc_mutual_info, f1 and mcc from each choice's (log-likelihood, is-greedy)."""
    choices = T.doc_to_choice(task, doc)
    lls = [r[0] for r in results[: len(choices)]]
    greedy = [r[1] for r in results[: len(choices)]]
    gold = _gold(task, doc, choices)
    golds = gold if isinstance(gold, list) else [gold]
    pred = _argmax(lls)
    scores = {
        "acc": float(pred in golds),
        "acc_norm": float(_argmax([ll / len(c) for ll, c in zip(lls, choices)]) in golds),
        "acc_bytes": float(_argmax([ll / len(c.encode("utf-8")) for ll, c in zip(lls, choices)]) in golds),
        "exact_match": float(any(greedy[g] for g in golds if g != -100)),
        "f1": (gold, pred), "mcc": (gold, pred),
    }
    if "acc_mutual_info" in wanted:
        uncond = [r[0] for r in results[len(choices):]]
        scores["acc_mutual_info"] = float(_argmax([c - u for c, u in zip(lls, uncond)]) in golds)
    return {m: scores[m] for m in wanted}


def _loglikelihood(model, task, docs, contexts, settings) -> list[_Doc]:
    args = [(c, T.doc_to_target(task, d)) for d, c in zip(docs, contexts)]
    results = model.loglikelihood([model.encode_pair(c, t) for c, t in args])
    wanted = [e["metric"] for e in task.metrics()]
    return [_Doc(d, [a], [[r]], {"none": ([r], {m: r[0] if m == "perplexity" else float(r[1]) for m in wanted})})
            for d, a, r in zip(docs, args, results)]


def _rolling(model, task, docs) -> list[_Doc]:
    """Each document's rolling-window log-likelihood, weighted by its words or bytes (lm-eval's definitions)."""
    texts = [T.doc_to_target(task, d) for d in docs]
    lls = [ll for ll, _ in model.loglikelihood_rolling(texts)]
    wanted = [e["metric"] for e in task.metrics()]
    out = []
    for d, t, ll in zip(docs, texts, lls):
        weight = {"word_perplexity": len(re.split(r"\s+", t))}
        out.append(_Doc(d, [(t,)], [[ll]], {"none": ([ll], {m: (ll, weight.get(m, len(t.encode("utf-8"))))
                                                            for m in wanted})}))
    return out


def _generate(model, task, docs, contexts, settings) -> list[_Doc]:
    gen = dict(task.get("generation_kwargs", {}))
    until = gen.get("until", [task.get("fewshot_delimiter", "\n\n")])
    until = [until] if isinstance(until, str) else list(until)
    gen["until"] = until
    n = int(task.get("repeats", 1))
    flat = model.generate_until(contexts, until, int(gen.get("max_gen_toks", 256)), sampling=T.sampling(gen), n=n,
                                seed=settings.seed)
    outputs = [flat[i * n: (i + 1) * n] for i in range(len(docs))]
    records = [_Doc(d, [(c, gen)], [o], {}) for d, c, o in zip(docs, contexts, outputs)]
    filters = task.get("filter_list") or [{"name": "none", "filter": [{"function": "take_first"}]}]
    for f in filters:
        results = T.build_filter(task, f.get("filter", []))(outputs, docs)
        for r, result in zip(records, results):
            if callable(task.cfg.get("process_results")):
                scores = task.cfg["process_results"](r.doc, [result])
            else:
                scores = _generation_scores(task, r.doc, result)
            r.scored[f.get("name", "none")] = ([result], scores)
    return records


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
            scores["exact_match"] = float(any(M.exact_match(result, g, **kwargs) for g in golds))
        else:  # a !function metric, called the way lm-eval calls it
            value = metric(references=[gold], predictions=[result], **kwargs)
            scores.update(value if isinstance(value, dict) else {metric.__name__: value})
    return scores


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def logged_arguments(arguments: list) -> dict:
    """Each request's arguments as lm-eval's sample files hold them: {"gen_args_i": {"arg_j": ...}}."""
    return {f"gen_args_{i}": {f"arg_{j}": a for j, a in enumerate(args)} for i, args in enumerate(arguments)}


def strings(x):
    """Responses as lm-eval logs them: every leaf a string, tuples and lists kept (its sanitize_list)."""
    return [strings(i) for i in x] if isinstance(x, (list, tuple)) else str(x)


def _log_records(task: T.Task, records: list[_Doc]) -> list[dict]:
    """One line per document and filter, with lm-eval's --log_samples fields and the per-document metrics."""
    out = []
    for doc_id, r in enumerate(records):
        target = T.doc_to_target(task, r.doc)
        for filt, (filtered, scores) in r.scored.items():
            out.append({
                "doc_id": doc_id, "doc": r.doc, "target": str(target),
                "arguments": logged_arguments(r.arguments),
                "resps": strings(r.resps), "filtered_resps": strings(filtered), "filter": filt,
                "metrics": list(scores),
                "doc_hash": _sha(json.dumps(r.doc, indent=2, default=str, ensure_ascii=False)),
                "prompt_hash": _sha(r.arguments[0][0]), "target_hash": _sha(str(target)),
                **{k: list(v) if isinstance(v, tuple) else v for k, v in scores.items()},
            })
    return out


def leaf_tasks(items: list) -> list[T.Task]:
    """The tasks to run, each once, in order."""
    seen: dict[str, T.Task] = {}
    for item in items:
        for t in item.leaves() if isinstance(item, G.Group) else [item]:
            seen.setdefault(t.name, t)
    return list(seen.values())


def unsafe(items: list) -> list[str]:
    """'task: why' for every task that would run model-written code outside lmforge's sandbox."""
    return [f"{t.name}: {why}" for t in leaf_tasks(items) if (why := T.unsafe_reason(t))]


def evaluate(model, items: list, *, limit: float | None = None, num_fewshot: int | None = None,
             settings: Settings | None = None, samples: dict | None = None, log=print) -> dict[str, dict]:
    """Run every task once, then aggregate the groups; {name: results}, groups before their tasks. With `samples`
    (a dict), each task's per-document records go to samples[task name]."""
    results = {}
    for task in leaf_tasks(items):
        t0 = time.perf_counter()
        logged = [] if samples is not None else None
        results[task.name] = run_task(model, task, limit, num_fewshot, settings, logged)
        results[task.name]["seconds"] = round(time.perf_counter() - t0, 2)
        if samples is not None:
            samples[task.name] = logged
        log(f"{task.name}: {results[task.name]['n_samples']} documents in {results[task.name]['seconds']:.1f} s")
    ordered: dict[str, dict] = {}

    def place(item, depth: int):
        if isinstance(item, G.Group):
            ordered[item.name] = {"alias": " - " * depth + (item.alias or item.name), **G.aggregate(item, results)}
            for child in item.children:
                place(child, depth + 1)
        elif item.name not in ordered:
            alias = item.get("task_alias") or item.name
            ordered[item.name] = {"alias": " - " * depth + alias, **results[item.name]}

    for item in items:
        place(item, 0)
    return ordered


def group_tree(items: list) -> dict[str, list[str]]:
    """{group: its children's names} for every group (lm-eval's `group_subtasks`)."""
    out: dict[str, list[str]] = {}

    def walk(item):
        if isinstance(item, G.Group):
            out[item.name] = [c.name for c in item.children]
            for c in item.children:
                walk(c)

    for item in items:
        walk(item)
    return out


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
    """lm-eval's console table: task (its alias, indented under its group), documents, shots, metric, value ± stderr."""
    lines = ["| Task | n | Shots | Metric | Value | Stderr |", "|---|---:|---:|---|---:|---:|"]
    for task, metric, value, stderr in metric_rows(results):
        r = results[task]
        se = "" if stderr is None else f"± {stderr:.4f}"
        lines.append(f"| {r.get('alias', task)} | {r.get('n_samples', '')} | {r.get('num_fewshot', '')} | {metric} | "
                     f"{value:.4f} | {se} |")
    return "\n".join(lines)


def read_results(path: str | Path) -> dict[str, dict]:
    """Task results from an `lmforge eval tasks --out` file or an lm-eval results JSON (its `,none` keys dropped).

    A directory stands for the one results file inside it."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*.json") if p.name.startswith(("results", "eval")))
        if len(found) != 1:
            raise UserError(f"{path}: expected one results JSON inside, found {len(found)}"
                             + (f" ({', '.join(str(p) for p in found[:4])})" if found else ""))
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such results file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict):
        raise UserError(f"{path}: no `results` mapping (write one with `lmforge eval tasks --out`)")
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
