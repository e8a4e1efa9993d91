"""Evaluation on CPU: `lmforge eval` vs lm-evaluation-harness's `hf` backend, same model, same data, same run.

Both sides score SmolLM2-135M-Instruct (float32) from the same HF directory, converted from the GGUF
once by `lmforge.model.load.hf_dir` in this (parent) process, each as the command a user would type,
in its own process (wall time from start to exit, model loading included):

- perplexity: --docs (8) documents of --doc-chars (5000) characters cut from tinyshakespeare, rolling
  windows of --max-length (1024) tokens.
  lmforge: `lmforge eval perplexity HF_DIR --data docs.jsonl --max-length L`;
  lm-eval: `lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32,max_length=L` on a YAML
  task with `output_type: loglikelihood_rolling` over the same file (word_perplexity, byte_perplexity,
  bits_per_byte).
- multiple choice: --questions (200) HellaSwag-shaped questions from tinyshakespeare: the context is
  --context-lines (4) consecutive lines of the play, the choices the true next line and 3 lines
  drawn at random (seeded) from elsewhere; acc and acc_norm. One lm-eval YAML task file, run by
  `lmforge eval tasks HF_DIR --tasks mc.yaml` and by `lm_eval --model hf ... --tasks mc`.

lm-eval runs at --lm-eval-batch-sizes (1 = its default, and 16); lmforge at its defaults. Values must
agree (perplexities within 0.1 % relative, identical acc / acc_norm); the target is lmforge >= 1.5x
faster than lm-eval's best batch size. Every side runs --repeats times, interleaved, after waiting
for the machine to go idle; medians are reported.

    python bench/eval_cpu.py [--repeats 3] [--questions 200] [--docs 8] [--doc-chars 5000]
        [--max-length 1024] [--lm-eval-batch-sizes 1,16] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune_cpu import wait_idle  # bench/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_data(out: Path, questions: int, context_lines: int, docs: int, doc_chars: int) -> None:
    """docs.jsonl + ppl.yaml (perplexity) and mc.jsonl + mc.yaml (multiple choice) under `out`."""
    text = SHAKESPEARE.read_text(encoding="utf-8")
    step = len(text) // docs
    with open(out / "docs.jsonl", "w") as f:
        for i in range(docs):
            f.write(json.dumps({"text": text[i * step: i * step + doc_chars]}) + "\n")
    (out / "ppl.yaml").write_text(
        f"task: ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'docs.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 20]
    rng = random.Random(0)
    with open(out / "mc.jsonl", "w") as f:
        for start in rng.sample(range(len(lines) - context_lines - 1), questions):
            ctx = " ".join(lines[start: start + context_lines])
            true = lines[start + context_lines]
            others = [lines[j] for j in rng.sample(range(len(lines)), 3)]
            choices = others + [true]
            rng.shuffle(choices)
            f.write(json.dumps({"context": ctx, "choices": choices, "label": choices.index(true)}) + "\n")
    (out / "mc.yaml").write_text(
        f"task: mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {out / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: choices\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return seconds


def lm_eval_run(model: Path, task: str, data: Path, out: Path, batch: int, max_length: int | None) -> dict:
    args = f"pretrained={model},dtype=float32" + (f",max_length={max_length}" if max_length else "")
    seconds = timed([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", args, "--device", "cpu",
                     "--batch_size", str(batch), "--include_path", str(data), "--tasks", task,
                     "--output_path", str(out)], data)
    [res] = out.rglob("results_*.json")
    values = {k.removesuffix(",none"): v for k, v in json.loads(res.read_text())["results"][task].items()}
    for p in out.rglob("*.json"):
        p.unlink()
    return {"seconds": seconds, **values}


def lmforge_ppl(model: Path, data: Path, out: Path, max_length: int) -> dict:
    seconds = timed([sys.executable, "-m", "lmforge", "eval", "perplexity", str(model), "--data",
                     str(data / "docs.jsonl"), "--max-length", str(max_length), "--device", "cpu",
                     "--out", str(out)], data)
    return {"seconds": seconds, **json.loads(out.read_text())}


def lmforge_mc(model: Path, data: Path, out: Path) -> dict:
    seconds = timed([sys.executable, "-m", "lmforge", "eval", "tasks", str(model), "--tasks", str(data / "mc.yaml"),
                     "--device", "cpu", "--out", str(out)], data)
    return {"seconds": seconds, **json.loads(out.read_text())["results"]["mc"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--context-lines", type=int, default=4)
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--doc-chars", type=int, default=5000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--lm-eval-batch-sizes", default="1,16")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--wait-idle", type=float, default=300)
    ap.add_argument("--json")
    args = ap.parse_args()

    from lmforge.model.load import hf_dir
    model = hf_dir(args.model)
    batches = [int(b) for b in args.lm_eval_batch_sizes.split(",")]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-evalbench-") as tmp:
        data = Path(tmp)
        make_data(data, args.questions, args.context_lines, args.docs, args.doc_chars)
        sides = [("lmforge ppl", lambda: lmforge_ppl(model, data, data / "ppl.json", args.max_length)),
                 ("lmforge mc", lambda: lmforge_mc(model, data, data / "mc.json"))]
        for b in batches:
            sides += [(f"lm-eval ppl bs{b}", lambda b=b: lm_eval_run(model, "ppl", data, data / "lm", b,
                                                                       args.max_length)),
                      (f"lm-eval mc bs{b}", lambda b=b: lm_eval_run(model, "mc", data, data / "lm", b, None))]
        for r in range(args.repeats):
            for name, fn in sides:
                busy = wait_idle(args.wait_idle)  # cores other work used just before this side started
                result = fn()
                result["busy_before"] = round(busy, 2)
                runs.setdefault(name, []).append(result)
                print(f"[{r + 1}/{args.repeats}] {name}: {result['seconds']:.1f} s", flush=True)

    def med(name, key="seconds"):
        return statistics.median(x[key] for x in runs[name])

    ours_ppl, ours_mc = runs["lmforge ppl"][0], runs["lmforge mc"][0]
    print("\n| workload | side | seconds (median) | values |\n|---|---|---:|---|")
    print(f"| perplexity | lmforge | {med('lmforge ppl'):.1f} | word {ours_ppl['word_perplexity']:.4f}, "
          f"byte {ours_ppl['byte_perplexity']:.6f}, bpb {ours_ppl['bits_per_byte']:.6f} |")
    for b in batches:
        t = runs[f"lm-eval ppl bs{b}"][0]
        rel = max(abs(ours_ppl[k] / t[k] - 1) for k in ("word_perplexity", "byte_perplexity", "bits_per_byte"))
        print(f"| perplexity | lm-eval hf bs{b} | {med(f'lm-eval ppl bs{b}'):.1f} | word {t['word_perplexity']:.4f}, "
              f"byte {t['byte_perplexity']:.6f}, bpb {t['bits_per_byte']:.6f} (max rel diff {rel:.1e}); "
              f"lmforge {med(f'lm-eval ppl bs{b}') / med('lmforge ppl'):.2f}x faster |")
    print(f"| {args.questions}-question MC | lmforge | {med('lmforge mc'):.1f} | acc {ours_mc['acc']:.4f}, "
          f"acc_norm {ours_mc['acc_norm']:.4f} |")
    for b in batches:
        t = runs[f"lm-eval mc bs{b}"][0]
        same = t["acc"] == ours_mc["acc"] and t["acc_norm"] == ours_mc["acc_norm"]
        print(f"| {args.questions}-question MC | lm-eval hf bs{b} | {med(f'lm-eval mc bs{b}'):.1f} | acc {t['acc']:.4f}, "
              f"acc_norm {t['acc_norm']:.4f} ({'identical' if same else 'DIFFERENT'}); "
              f"lmforge {med(f'lm-eval mc bs{b}') / med('lmforge mc'):.2f}x faster |")
    spread = ["{}: {}".format(k, ", ".join(f"{x['seconds']:.1f}" for x in v)) for k, v in runs.items()]
    print("\nruns (seconds): " + "; ".join(spread))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
