"""`lmforge quickstart --full` end to end on a reduced budget: killed after a stage and rerun, it skips the finished
stages, then every stage prints its line, the numbers move the right way, and the report and artefacts exist."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

from conftest import ROOT, run_cli

STAGES = ("collect", "clean", "corpus", "tokenizer", "tokenize", "pretrain", "eval-pretrain", "sft", "eval-sft", "dpo",
          "eval-dpo", "serve")


def test_full_quickstart_resumes_and_reports(tmp_path):
    out = tmp_path / "qs"
    first = subprocess.Popen([sys.executable, "-m", "lmforge", "quickstart", "--full", "--minutes", "0.5",
                              "--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.monotonic() + 180
    while not (out / "tokenize").is_dir() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the command and its stage's process, mid-pretraining, five stages done
    first.wait()
    assert (out / "tokenize" / "stage.json").is_file() and not (out / "pretrain").exists()
    done_at = {s: os.stat(out / s / "stage.json").st_mtime_ns for s in STAGES[:5]}

    text = run_cli("quickstart", "--full", "--minutes", "0.5", "--out", str(out), timeout=900).stdout
    for i, stage in enumerate(STAGES, 1):
        assert re.search(rf"^\[{i}/{len(STAGES)}\] +{re.escape(stage)} ", text, re.M), (stage, text)
    for stage in STAGES[:5]:  # finished before the kill: read back, not rerun
        assert re.search(rf"\] +{stage} +done before", text), (stage, text)
        assert os.stat(out / stage / "stage.json").st_mtime_ns == done_at[stage]
    assert (out / "logs" / "tokenize.log").read_text().count("$ lmforge") == 1, "tokenize ran again"
    assert "done before" not in text.split("[6/")[1]
    assert not list(out.glob(".*.partial"))

    r = json.loads((out / "report.json").read_text())
    assert r["collect"]["skipped"]["robots"] == 1  # the page under /private/ that robots.txt disallows
    assert r["clean"]["docs_out"] >= 1
    assert r["pretrain"]["val_ppl_after"] < r["pretrain"]["val_ppl_before"] / 2
    assert r["sft"]["val_loss_after"] < r["sft"]["val_loss_before"]
    assert r["dpo"]["acc_after"] > r["dpo"]["acc_before"]
    assert r["eval-sft"]["perplexity"] > 1 and 0 <= r["eval-dpo"]["mc_acc"] <= 1
    assert r["serve"]["answer"], "the served model sent back an empty answer"
    assert "funnel: read" in text and "POST /v1/chat/completions" in text
    table = (out / "report.md").read_text()
    for stage in STAGES:
        assert re.search(rf"^{re.escape(stage)} +\d+s ", table, re.M), (stage, table)
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    for path in ("collect/crawl/crawl.warc.gz", "clean/report.json", "corpus/tasks/docstring_mc.yaml",
                 "tokenizer/tokenizer.json", "tokenize/meta.json", "pretrain/run/checkpoints/latest",
                 "sft/run/checkpoints/latest", "dpo/run/checkpoints/latest", "eval-dpo/tasks.json", "serve/response.json"):
        assert (out / path).exists(), path
        assert str(out / path.split("/")[0]) in text, path  # every artefact's place is printed
