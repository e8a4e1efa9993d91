"""`lmforge quickstart --full`: the whole guide on the installed Python alone, offline, in about ten minutes.

collect (pydoc HTML on loopback, `data crawl`) -> clean (`data run`) -> corpus (docstring SFT, DPO and
multiple-choice data) -> tokenize (`tokenizer train`, `tokenize`) -> pretrain -> eval -> finetune (SFT) ->
eval -> align (DPO) -> eval -> serve (one OpenAI chat request) -> report.

Every stage runs as `python -m lmforge COMMAND ...`, the command a user types, with its output in
DIR/logs/STAGE.log. A stage works in DIR/.STAGE.partial and renames it to DIR/STAGE when it is done, so
the directory is the completion marker: a rerun skips finished stages, and an unfinished one resumes
through its own command (crawl, data run, pretrain, finetune and align all resume from their out_dir).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from lmforge.quickstart import material
from lmforge.quickstart.report import write_report

# Children run offline: the hub is never asked (every model and dataset here is a local path).
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
MODEL = {"model.preset": None, "model.hidden_size": 192, "model.num_layers": 4, "model.num_heads": 6,
         "model.intermediate_size": 512, "model.max_seq_len": 128}
PRETRAIN = {"train.micro_batch_size": 16, "train.lr": 2e-3, "train.min_lr": 2e-4, "train.beta2": 0.99,
            "train.eval_batches": 10, "train.keep_last": 1, "train.ckpt_every": 0, "log.progress": False,
            "log.tensorboard": False}
SFT = {"method": "full", "data.max_length": 128, "data.val_size": 0.1, "train.micro_batch_size": 16,
       "train.lr": 5e-4, "train.min_lr": 5e-5, "train.eval_batches": 10,
       "train.keep_last": 1, "train.ckpt_every": 0, "log.progress": False, "log.tensorboard": False}
DPO = {"algorithm": "dpo", "method": "full", "data.max_length": 128, "data.max_prompt_length": 48,
       "data.val_size": 0.1, "train.micro_batch_size": 8, "train.lr": 1e-4, "train.eval_batches": 10,
       "train.precision": "fp32",  # the policy starts equal to the reference: every held-out pair ties, exactly
       "train.keep_last": 1, "train.ckpt_every": 0, "dpo.beta": 0.1, "log.progress": False,
       "log.tensorboard": False}


@dataclass
class Run:
    """One `quickstart --full` run: where it writes, its time budget, and when it started."""
    out: Path
    minutes: float
    seed: int
    started: float

    @property
    def budget_s(self) -> float:
        return self.minutes * 60

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def log(self, stage: str) -> Path:
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        return self.out / "logs" / f"{stage}.log"


def keys(items: dict) -> list[str]:
    """`key=value` overrides, each value as YAML (JSON is YAML)."""
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


def lmforge(run: Run, stage: str, *args: str) -> None:
    """`python -m lmforge ARGS`, as a user runs it, offline; output appended to the stage's log."""
    lmforge_together(run, stage, list(args))


def lmforge_together(run: Run, stage: str, *commands: list[str]) -> None:
    """Several `python -m lmforge ...` at once (independent evaluations overlap their start-up on two cores); each
    one's output goes to its own log, then to the stage's log in order."""
    logs = [run.log(f"{stage}.{i}") for i in range(len(commands))]
    procs = []
    for args, log in zip(commands, logs):
        with log.open("w") as fh:
            fh.write(f"$ lmforge {' '.join(args)}\n")
            fh.flush()
            procs.append(subprocess.Popen([sys.executable, "-m", "lmforge", *args], stdout=fh,
                                          stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV}))
    codes = [p.wait() for p in procs]
    with run.log(stage).open("a") as fh:
        for log in logs:
            fh.write(log.read_text())
            log.unlink()
    for args, code in zip(commands, codes):
        if code:
            tail = "".join(run.log(stage).read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"stage {stage}: `lmforge {args[0]}` exited {code}; {run.log(stage)} ends:\n{tail}")


def free_port(wanted: int = 0) -> int:
    """`wanted` when it is free on loopback, else (or for 0) a port the kernel picks; 0 if `wanted` is taken."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", wanted))
        except OSError:
            return 0
        return s.getsockname()[1]


def site_port(work: Path) -> int:
    """The port of an interrupted crawl again (its resume state names the URL), else a fresh one."""
    saved = work / "port"
    port = free_port(int(saved.read_text())) if saved.is_file() else 0
    if not port:
        shutil.rmtree(work / "crawl", ignore_errors=True)
        port = free_port()
    saved.write_text(f"{port}\n")
    return port


def wait_for(url: str, proc: subprocess.Popen, seconds: float) -> None:
    """Poll `url` until it answers 200, the process exits, or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[2:4]} exited {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {seconds:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def curve(records: list[dict], key: str) -> list[list[float]]:
    return [[r["step"], r[key]] for r in records if key in r]


# ---- the stages: each works in `work` and returns its numbers, with a one-line summary under "line" -----------

def collect(run: Run, work: Path) -> dict:
    """Write pydoc HTML for the site modules, serve it on loopback, crawl it politely into WARC + JSONL."""
    n_pages = max(6, min(len(material.SITE_MODULES), round(6 * run.minutes)))
    modules = material.write_site(work / "site", n_pages)
    port = site_port(work)
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                               str(work / "site")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url + "robots.txt", server, 20)
        lmforge(run, "collect", "data", "crawl", url + "index.html", "--out", str(work / "crawl"),
                "--max-pages", str(len(modules) + 5), "--max-depth", "1", "--delay-s", "0.05",
                "--allow-net", "127.0.0.0/8", "--quiet")
    finally:
        stop(server)
    report = json.loads((work / "crawl" / "crawl_report.json").read_text())
    skips = {k: v for k, v in report["skipped"].items() if v}
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(skips.items()))
    return {"pages": report["fetched"], "docs": report["documents"], "skipped": skips,
            "line": f"crawled {url} (pydoc HTML of {len(modules)} modules): {report['fetched']} pages, "
                    f"{report['documents']} documents; skipped: {skipped or 'none'}"}


def clean(run: Run, work: Path) -> dict:
    """`data run` over the crawl's WARC: extraction, quality filters, dedup, PII."""
    # API pages hold more symbols and short tokens than prose: Gopher's alpha and symbol ratios are relaxed.
    quality = {"min_words": 30, "min_alpha_words_ratio": 0.5, "max_symbol_word_ratio": 0.5}
    steps = [{"extract": {}}, {"gopher_quality": quality}, {"gopher_repetition": {}}, {"dedup": {}}, {"pii": {}}]
    warc = run.out / "collect" / "crawl" / "crawl.warc.gz"
    lmforge(run, "clean", "data", "run", f"inputs={json.dumps([str(warc)])}", f"out_dir={work}",
            f"steps={json.dumps(steps)}", "output_format=jsonl")
    report = json.loads((work / "report.json").read_text())
    funnel = [f"read {report['read']['n_docs']}"] + [f"{s['name']} {s['docs_out']}" for s in report["steps"]]
    return {"docs_in": report["read"]["n_docs"], "docs_out": report["docs_out"],
            "line": "funnel: " + " -> ".join(funnel)}


def corpus(run: Run, work: Path) -> dict:
    """Pretraining text (cleaned pages + stdlib source), held-out text, and the SFT / DPO / MC data."""
    train_files, held_files = material.stdlib_sources(max_bytes=int(min(6.0, 0.6 * run.minutes) * 1e6))
    pages = [json.loads(line) for f in sorted((run.out / "clean").glob("shard-*.jsonl"))
             for line in f.read_text().splitlines() if line.strip()]
    with (work / "pretrain.jsonl").open("w") as fh:
        for doc in pages:
            fh.write(json.dumps({"text": doc["text"]}) + "\n")
        for f in train_files:
            fh.write(json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n")
    with (work / "heldout.jsonl").open("w") as fh:
        for f in held_files:
            fh.write(json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n")
    docs = material.docstring_pairs(material.stdlib_files())
    train, held = material.split_docs(docs, n_heldout=min(60, len(docs) // 8))
    answers, wrong = train[len(train) // 4:], train[:len(train) // 4]
    n_sft = material.write_sft(answers, work / "sft.jsonl")
    n_dpo = material.write_dpo(answers, wrong, work / "dpo.jsonl", run.seed)
    task = material.write_mc_task(held, work / "tasks", run.seed)
    mb = (work / "pretrain.jsonl").stat().st_size / 1e6
    return {"pretrain_docs": len(pages) + len(train_files), "heldout_files": len(held_files), "sft": n_sft,
            "dpo": n_dpo, "mc": len(held), "task": str(task),
            "line": f"{len(pages)} pages + {len(train_files)} stdlib modules ({mb:.1f} MB) to pretrain on, "
                    f"{len(held_files)} modules held out; {n_sft} SFT and {n_dpo} DPO pairs, "
                    f"{len(held)} held-out MC questions"}


def tokenizer(run: Run, work: Path) -> dict:
    """`tokenizer train`: a byte-level BPE on the pretraining text (its own stage: the shards name its final path)."""
    lmforge(run, "tokenizer", "tokenizer", "train", str(run.out / "corpus" / "pretrain.jsonl"), "--out", str(work),
            "--vocab-size", "4096")
    return {"vocab": 4096, "line": f"byte-level BPE, vocab 4,096, on {run.out / 'corpus' / 'pretrain.jsonl'}"}


def tokenize(run: Run, work: Path) -> dict:
    """`tokenize` the pretraining text into train/val shards."""
    lmforge(run, "tokenize", "tokenize", str(run.out / "corpus" / "pretrain.jsonl"), "--tokenizer",
            str(run.out / "tokenizer"), "--out", str(work), "--val-fraction", "0.05")
    n = json.loads((work / "meta.json").read_text())["n_tokens"]
    return {"train_tokens": n["train"], "val_tokens": n["val"],
            "line": f"{n['train']:,} train and {n['val']:,} val tokens"}


def pretrain(run: Run, work: Path) -> dict:
    """Time 10 steps, size the run to what the budget leaves after the later stages, pretrain."""
    base = {"data.dir": str(run.out / "tokenize"), "seed": run.seed, **MODEL, **PRETRAIN}
    plan = work / "plan.json"  # a resumed run keeps the step count it was started with
    if not plan.is_file():
        lmforge(run, "pretrain", "pretrain", *keys({**base, "out_dir": str(work / "calibration"), "train.max_steps": 10,
                                                   "train.log_every": 5, "train.eval_every": 0, "resume": "never",
                                                   "train.warmup_steps": 2}))
        rate = [r["tokens_per_sec"] for r in metrics(work / "calibration") if "tokens_per_sec" in r][-1]
        shutil.rmtree(work / "calibration")
        step_s = 16 * 128 / rate
        later_s = 60 + 0.42 * run.budget_s  # three evals, SFT, DPO, serve
        seconds = max(10.0, run.left_s() - later_s)
        plan.write_text(json.dumps({"step_s": step_s, "steps": max(30, int(seconds / (step_s * 1.15)))}) + "\n")
    step_s, steps = (json.loads(plan.read_text())[k] for k in ("step_s", "steps"))
    lmforge(run, "pretrain", "pretrain", *keys({**base, "out_dir": str(work / "run"), "train.max_steps": steps,
                                               "train.warmup_steps": min(50, steps // 5), "train.log_every": 10,
                                               "train.eval_every": max(10, steps // 4)}))
    recs = metrics(work / "run")
    evals = [r for r in recs if "val_loss" in r]
    return {"steps": steps, "step_s": step_s, "val_ppl_before": evals[0]["val_ppl"],
            "val_ppl_after": evals[-1]["val_ppl"],
            "loss": curve(recs, "loss"), "val_loss": curve(recs, "val_loss"),
            "line": f"{steps} steps of a 4-layer 192-wide Llama; val perplexity {evals[0]['val_ppl']:,.1f} -> "
                    f"{evals[-1]['val_ppl']:,.1f}"}


def evaluate(model_stage: str) -> Callable[[Run, Path], dict]:
    """`eval perplexity` on the held-out modules and `eval tasks` on the held-out docstring MC task."""
    def stage(run: Run, work: Path) -> dict:
        name = f"eval-{model_stage}"
        model = str(run.out / model_stage / "run")
        lmforge_together(run, name, ["eval", "perplexity", model, "--data", str(run.out / "corpus" / "heldout.jsonl"),
                                     "--out", str(work / "perplexity.json")],
                         ["eval", "tasks", model, "--tasks", str(run.out / "corpus" / "tasks" / "docstring_mc.yaml"),
                          "--out", str(work / "tasks.json")])
        ppl = json.loads((work / "perplexity.json").read_text())["token_perplexity"]
        acc = json.loads((work / "tasks.json").read_text())["results"]["docstring_mc"]["acc"]
        chance = 1 / material.CHOICES
        return {"perplexity": ppl, "mc_acc": acc, "chance": chance,
                "line": f"held-out perplexity {ppl:,.1f}; docstring MC acc {acc:.3f} (chance {chance:.2f})"}
    return stage


def fine_tune(run: Run, stage: str, work: Path, command: list[str], items: dict, budget_share: float,
              step_cost: float) -> tuple[int, list[dict]]:
    """Run `lmforge COMMAND` on the previous model for its share of the budget; its step count and metrics.

    `step_cost` is a step's time relative to a pretraining step (measured by the pretrain stage's calibration)."""
    step_s = json.loads((run.out / "pretrain" / "stage.json").read_text())["step_s"]
    steps = max(20, int(budget_share * run.budget_s / (step_s * step_cost)))
    lmforge(run, stage, *command, *keys({**items, "out_dir": str(work / "run"), "seed": run.seed,
                                         "train.max_steps": steps, "train.warmup_steps": min(10, steps // 5),
                                         "train.log_every": 5, "train.eval_every": max(5, steps // 4)}))
    return steps, metrics(work / "run")


def sft(run: Run, work: Path) -> dict:
    """`finetune` (full) on the docstring Q/A pairs; held-out loss before and after."""
    steps, recs = fine_tune(run, "sft", work, ["finetune"], {**SFT, "base_model": str(run.out / "pretrain" / "run"),
                                                             "data.path": str(run.out / "corpus" / "sft.jsonl")},
                            budget_share=0.12, step_cost=0.8)
    evals = [r for r in recs if "val_loss" in r]
    return {"steps": steps, "val_loss_before": evals[0]["val_loss"], "val_loss_after": evals[-1]["val_loss"],
            "loss": curve(recs, "loss"), "val_loss": curve(recs, "val_loss"),
            "line": f"{steps} steps on docstring Q/A; held-out SFT loss {evals[0]['val_loss']:.3f} -> "
                    f"{evals[-1]['val_loss']:.3f}"}


def dpo(run: Run, work: Path) -> dict:
    """`align algorithm=dpo` (full) on the docstring preference pairs; held-out implicit-reward accuracy."""
    steps, recs = fine_tune(run, "dpo", work, ["align"], {**DPO, "base_model": str(run.out / "sft" / "run"),
                                                          "data.path": str(run.out / "corpus" / "dpo.jsonl")},
                            budget_share=0.10, step_cost=1.2)
    evals = [r for r in recs if "val_rewards/accuracies" in r]
    acc0, acc1 = evals[0]["val_rewards/accuracies"], evals[-1]["val_rewards/accuracies"]
    return {"steps": steps, "acc_before": acc0, "acc_after": acc1, "loss": curve(recs, "loss"),
            "val_loss": curve(recs, "val_loss"),
            "line": f"{steps} steps on docstring preferences; held-out reward accuracy {acc0:.2f} -> {acc1:.2f}"}


def serve(run: Run, work: Path) -> dict:
    """`lmforge serve` the aligned model, one chat request in the OpenAI wire format over plain HTTP, stop."""
    port = free_port()
    log = run.log("serve").open("a")
    server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(run.out / "dpo" / "run"),
                               "--port", str(port), "--served-model-name", "quickstart"],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **OFFLINE_ENV})
    question = material.QUESTION.format(name="json.dumps")
    request = {"model": "quickstart", "messages": [{"role": "user", "content": question}], "max_tokens": 40,
               "temperature": 0}
    try:
        wait_for(f"http://127.0.0.1:{port}/health", server, 120)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(request).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            response = json.loads(r.read())
    finally:
        stop(server)
        log.close()
    answer = response["choices"][0]["message"]["content"].strip()
    (work / "request.json").write_text(json.dumps(request, indent=2) + "\n")
    (work / "response.json").write_text(json.dumps(response, indent=2) + "\n")
    return {"question": question, "answer": answer, "line": f"POST /v1/chat/completions {question!r} -> {answer!r}"}


STAGES: list[tuple[str, Callable[[Run, Path], dict]]] = [
    ("collect", collect), ("clean", clean), ("corpus", corpus), ("tokenizer", tokenizer), ("tokenize", tokenize),
    ("pretrain", pretrain),
    ("eval-pretrain", evaluate("pretrain")), ("sft", sft), ("eval-sft", evaluate("sft")), ("dpo", dpo),
    ("eval-dpo", evaluate("dpo")), ("serve", serve),
]


def run_stage(run: Run, i: int, name: str, fn: Callable[[Run, Path], dict]) -> dict:
    """Run one stage in DIR/.NAME.partial and rename it to DIR/NAME; a finished one is read back, not rerun."""
    final, work = run.out / name, run.out / f".{name}.partial"
    head = f"{f'[{i}/{len(STAGES)}]':<7} {name:<13}"
    if (final / "stage.json").is_file():
        numbers = json.loads((final / "stage.json").read_text())
        print(f"{head} done before ({numbers['seconds']:.0f} s then): {numbers['line']}", flush=True)
        return numbers
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    numbers = fn(run, work)
    numbers["seconds"] = time.perf_counter() - t0
    (work / "stage.json").write_text(json.dumps(numbers) + "\n")
    os.replace(work, final)
    print(f"{head} {numbers['line']}  ({numbers['seconds']:.0f} s)", flush=True)
    return numbers


def quickstart_full(out: Path, minutes: float = 9.0, seed: int = 1337) -> dict:
    """Every stage in order (finished ones skipped), then the report; returns each stage's numbers."""
    out = out.resolve()  # the stages' files name each other by absolute path
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out=out, minutes=minutes, seed=seed, started=time.perf_counter())
    print(f"quickstart --full into {out} (budget {minutes:g} min; stage logs in {out / 'logs'})", flush=True)
    results = {name: run_stage(run, i, name, fn) for i, (name, fn) in enumerate(STAGES, 1)}
    elapsed = time.perf_counter() - run.started
    table, paths = write_report(out, results, elapsed)
    print("=" * 78)
    print(table)
    print("-" * 78)
    for label, path in paths:
        print(f"{label:<12}{path}")
    print(f"time:       {elapsed:.0f} s this run")
    return results
