"""`lmforge quickstart` end to end on a small corpus: falling perplexity, a sample, files where it says."""
from __future__ import annotations

import re

from conftest import run_cli, synthetic_text


def test_quickstart_on_own_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):  # several documents, so the split has val documents
        (corpus / f"doc{i:02d}.txt").write_text(synthetic_text(20_000, seed=i))
    out = tmp_path / "qs"
    proc = run_cli("quickstart", "--data", str(corpus), "--out", str(out), "--minutes", "0.5", timeout=240)
    text = proc.stdout
    m = re.search(r"val perplexity: ([\d,.]+) before -> ([\d,.]+) after", text)
    assert m, text
    before, after = (float(g.replace(",", "")) for g in m.groups())
    assert after < before / 2, text
    assert re.search(r"sample:\n.+", text)
    for path in ("tokenizer/tokenizer.json", "data/train.bin", "data/val.bin", "data/meta.json",
                 "run/config.yaml", "run/metrics.jsonl", "run/checkpoints/latest"):
        assert (out / path).exists(), path
    assert not (out / "calibration").exists()
