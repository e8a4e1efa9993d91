"""Document processing and metrics that the built-in task YAMLs name with `!function utils.<name>`.

They take and return what lm-eval passes, so the YAML files run under lm-eval unchanged.
"""
import re


def _clean(text: str) -> str:
    """HellaSwag's WikiHow artifacts: " [title]" becomes ". ", other bracketed tags go, double spaces collapse."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def process_hellaswag(dataset):
    """query = "<activity>: <ctx_a> <Ctx_b>", choices = the cleaned endings, gold = label (lm-eval's process_docs)."""
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _clean(doc["activity_label"] + ": " + ctx),
                "choices": [_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def build_predictions(resps, docs):
    """HumanEval programs: the prompt (signature and docstring) followed by each completion."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs)]


def pass_at_k(references, predictions, k=None):
    """{"pass@k": ...}: each candidate program followed by its tests, run in lmforge's sandbox (3 s, 1 GiB each)."""
    import os

    from lmforge.eval.sandbox import pass_at_k as estimate, run_many

    ks = [k] if isinstance(k, int) else list(k or [1])
    programs, owners = [], []
    for i, (test, candidates) in enumerate(zip(references, predictions)):
        for c in candidates:
            programs.append(c + "\n" + test)
            owners.append(i)
    results = run_many(programs, workers=max(1, min(4, os.cpu_count() or 1)), timeout_s=3.0, memory_mb=1024)
    passed = [0] * len(references)
    for i, r in zip(owners, results):
        passed[i] += r.status == "passed"
    scores = {}
    for kk in ks:
        per = [estimate(len(c), p, kk) for c, p in zip(predictions, passed) if len(c) >= kk]
        scores[f"pass@{kk}"] = sum(per) / len(per) if per else 0.0
    return scores


pass_at_k.lmforge_sandboxed = True  # `eval tasks` runs it without --confirm-run-unsafe-code (see tasks.unsafe_reason)
