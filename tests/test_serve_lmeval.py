"""lm-eval-harness against `lmforge serve`: its `local-completions` backend must score exactly like lm-eval's own
`hf` backend on the same model.

Two small tasks live in tests/data/lmeval/ (lm-eval YAML, data files relative to the repository root): a 30-question
multiple-choice task (loglikelihood requests: `echo` + `logprobs` on prompt token ids) and a 14-question
generate-until task (greedy generation with stop strings). Both backends run through lm-eval's CLI with
--log_samples, so a disagreement is reported per question, with the log-probabilities or texts that differ.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, require, start_server, stop_server

pytestmark = pytest.mark.slow

TASK_DIR = ROOT / "tests" / "data" / "lmeval"
MC, QA = "lmforge_mc", "lmforge_qa"
N_DOCS = {MC: 30, QA: 14}
METRICS = {MC: ("acc,none", "acc_norm,none"), QA: ("exact_match,strip",)}
LOGPROB_TOL = 1e-3  # float32 on CPU, different kernels: observed differences are ~1e-5


def run_lm_eval(model: str, model_args: str, out: Path, *flags: str, timeout: float = 1800) -> tuple[dict, dict]:
    """`python -m lm_eval` on both tasks from the repository root, offline; returns (results, samples by task)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args,
           "--include_path", str(TASK_DIR), "--tasks", f"{MC},{QA}", "--batch_size", "1",
           "--output_path", str(out / "results"), "--log_samples", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"lm_eval --model {model} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    [results_file] = (out / "results").rglob("results_*.json")
    samples = {}
    for task in (MC, QA):
        [f] = (out / "results").rglob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        samples[task] = {r["doc_id"]: r for r in rows}
    return json.loads(results_file.read_text()), samples


def mc_scores(sample: dict) -> list[tuple[float, bool]]:
    """(log P(choice | question), is_greedy) for each choice of one multiple-choice question."""
    return [(float(lp), str(greedy) == "True") for lp, greedy in sample["filtered_resps"]]


@pytest.fixture(scope="module")
def smol_dir(smollm2_cache) -> Path:
    from lmforge.model.load import hf_dir

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFORGE_CACHE", str(smollm2_cache))
        return Path(hf_dir("smollm2-135m-instruct"))


def test_local_completions_against_lmforge_serve_scores_like_hf_backend(smol_dir, smollm2_cache, tmp_path):
    require("lm_eval")
    for module in ("aiohttp", "tenacity", "requests"):  # lm-eval's [api] extra, needed by local-completions
        require(module, why="lm-eval[api], which the eval extra installs")
    model = str(smol_dir)

    hf_results, hf_samples = run_lm_eval("hf", f"pretrained={model},dtype=float32", tmp_path / "hf",
                                         "--device", "cpu")

    # --max-batch/--max-model-len only keep the KV cache small; lm-eval's default max_length is 2048 anyway.
    proc, url = start_server(model, "--max-batch", "8", "--max-model-len", "2048",
                             env={"LMFORGE_CACHE": str(smollm2_cache)})
    try:
        api_args = (f"model={model},base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                    "tokenized_requests=True,num_concurrent=4,max_retries=1,timeout=600")
        api_results, api_samples = run_lm_eval("local-completions", api_args, tmp_path / "api")
    finally:
        log = stop_server(proc)
    assert "Traceback" not in log, log[-3000:]

    # Both runs scored every question of both tasks.
    for res in (hf_results, api_results):
        for task, n in N_DOCS.items():
            assert res["n-samples"][task]["effective"] == n
            assert res["results"][task]["sample_len"] == n
    for samples in (hf_samples, api_samples):
        assert {t: len(s) for t, s in samples.items()} == N_DOCS

    # Per question first, so a mismatch says which question and by how much.
    mc_diffs = []
    for doc_id, hs in sorted(hf_samples[MC].items()):
        h, a = mc_scores(hs), mc_scores(api_samples[MC][doc_id])
        assert len(h) == len(a) == 4
        worst = max(abs(x[0] - y[0]) for x, y in zip(h, a))
        if worst > LOGPROB_TOL or [g for _, g in h] != [g for _, g in a]:
            mc_diffs.append(f"doc {doc_id} ({hs['doc']['question']!r}): hf {h} vs server {a}")
    assert not mc_diffs, "multiple-choice log-probabilities differ:\n" + "\n".join(mc_diffs)

    qa_diffs = []
    for doc_id, hs in sorted(hf_samples[QA].items()):
        a = api_samples[QA][doc_id]
        if hs["resps"] != a["resps"] or hs["filtered_resps"] != a["filtered_resps"]:
            qa_diffs.append(f"doc {doc_id} ({hs['doc']['question']!r}): hf {hs['resps']} vs server {a['resps']}")
    assert not qa_diffs, "generations differ:\n" + "\n".join(qa_diffs)

    # The acceptance criterion itself: the same accuracies.
    for task, metrics in METRICS.items():
        for metric in metrics:
            assert api_results["results"][task][metric] == hf_results["results"][task][metric], (task, metric)

    # And they are not degenerate: above chance on the 4-way task, some answers right in the generation task.
    assert hf_results["results"][MC]["acc,none"] > 0.25
    assert hf_results["results"][QA]["exact_match,strip"] > 0
