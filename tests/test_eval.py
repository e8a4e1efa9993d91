"""lmforge eval perplexity: lm-eval's rolling windows and metric definitions, checked against lm-eval itself."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from conftest import ROOT, require, run_cli, save_tiny, synthetic_text
from lmforge.eval.perplexity import rolling_windows


def test_rolling_windows_equal_lm_evals():
    utils = require("lm_eval.utils")
    rng = random.Random(0)
    for _ in range(1000):
        tokens = [rng.randint(2, 99) for _ in range(rng.randint(1, 60))]
        length = rng.randint(1, 20)
        context = rng.randint(1, length)
        want = [utils.make_disjoint_window(w) for w in utils.get_rolling_token_windows(tokens, 1, length, context)]
        assert rolling_windows(tokens, 1, length, length - context + 1) == [(list(a), list(b)) for a, b in want]


@pytest.mark.slow
def test_perplexity_equals_lm_eval_hf_backend(tmp_path):
    require("lm_eval")
    model = save_tiny(tmp_path / "tiny", seed=2)
    text = synthetic_text(6000, seed=5)
    docs = [text[i: i + 600] for i in range(0, 6000, 600)]  # 10 documents of ~600 characters, several windows each
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "ppl.yaml").write_text(
        "task: lmforge_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\n"
        "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}
    proc = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                           f"pretrained={model},dtype=float32,max_length=128", "--device", "cpu", "--batch_size", "1",
                           "--include_path", str(tmp_path / "tasks"), "--tasks", "lmforge_ppl",
                           "--output_path", str(tmp_path / "lm-eval")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [results] = (tmp_path / "lm-eval").rglob("results_*.json")
    want = json.loads(results.read_text())["results"]["lmforge_ppl"]

    out = tmp_path / "ppl.json"
    p = run_cli("eval", "perplexity", str(model), "--data", str(data), "--max-length", "128", "--device", "cpu",
                "--out", str(out))
    assert "word_perplexity" in p.stdout and "bits_per_byte" in p.stdout
    got = json.loads(out.read_text())
    assert set(got) >= {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert got["tokens"] == sum(len(d) for d in docs)  # a character tokenizer: every character scored once
    for key in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert got[key] == pytest.approx(want[f"{key},none"], rel=1e-3), key

    run_cli("eval", "perplexity", str(model), "--data", str(data), "--max-length", "128", "--stride", "32",
            "--device", "cpu", "--out", str(out))
    strided = json.loads(out.read_text())  # more left context per prediction: a different number, same tokens
    assert strided["tokens"] == got["tokens"] and strided["word_perplexity"] != got["word_perplexity"]


def test_perplexity_bad_inputs_are_one_line_errors(tmp_path):
    model = save_tiny(tmp_path / "tiny")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "broken.json").write_text('["fine", ')
    (tmp_path / "numbers.json").write_text("[1, 2]")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    (tmp_path / "table.csv").write_text("a,b\n")
    for args, message in [(["--data", str(tmp_path / "missing.txt")], "no such file"),
                          (["--data", str(bad)], "bad.jsonl:2: expected an object with a string `text`"),
                          (["--data", str(bad.with_suffix(".csv"))], "no such file"),
                          (["--data", str(tmp_path / "table.csv")], "table.csv: use .txt, .jsonl"),
                          (["--data", str(tmp_path / "broken.jsonl")], "broken.jsonl:2: not valid JSON"),
                          (["--data", str(tmp_path / "broken.json")], "broken.json: not valid JSON"),
                          (["--data", str(tmp_path / "numbers.json")], "numbers.json: expected a JSON list of strings"),
                          (["--data", str(tmp_path / "binary.txt")], "binary.txt: not UTF-8 text")]:
        p = run_cli("eval", "perplexity", str(model), *args, check=False, timeout=120)
        assert p.returncode == 2 and message in p.stderr and p.stderr.count("\n") == 1, p.stderr
    good = tmp_path / "good.txt"
    good.write_text("hello world")
    p = run_cli("eval", "perplexity", str(model), "--data", str(good), "--max-length", "8", "--stride", "9",
                check=False, timeout=120)
    assert p.returncode == 2 and "--stride must be between 1 and --max-length (8)" in p.stderr
