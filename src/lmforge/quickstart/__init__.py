"""`lmforge quickstart`: the whole pretraining path in a few minutes on a laptop CPU.

The default corpus is the Python standard library's own source, which exists wherever Python
does, so the demo needs no download. `quickstart --full` (full.py) runs every stage of the guide the same way.
"""
from __future__ import annotations

import json
import shutil
import sysconfig
import time
from pathlib import Path

from pydantic import Field, model_validator

from lmforge.command import Command
from lmforge.config import Strict, load_config

# The demo model: big enough to learn Python's surface in two minutes on two cores.
DEMO_MODEL = {"model.preset": None, "model.hidden_size": 192, "model.num_layers": 4, "model.num_heads": 6,
              "model.intermediate_size": 512, "model.max_seq_len": 128}
DEMO_TRAIN = {"train.micro_batch_size": 16, "train.lr": 2e-3, "train.min_lr": 2e-4, "train.warmup_steps": 50,
              "train.beta2": 0.99, "train.eval_batches": 10, "train.keep_last": 1}


def stdlib_corpus(max_bytes: int = 6_000_000) -> list[Path]:
    """Top-level standard-library modules, sorted, up to `max_bytes` of source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.glob("*.py")):
        size = f.stat().st_size
        if total + size > max_bytes:
            break
        files.append(f)
        total += size
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}; pass --data PATH")
    return files


def _steps_for_budget(cfg_items: dict, out_dir: Path, seconds: float) -> int:
    """Time a 20-step calibration run, then size the real run to the budget."""
    from lmforge.train.config import PretrainConfig
    from lmforge.train.pretrain import pretrain

    probe = dict(cfg_items, **{"out_dir": str(out_dir / "calibration"), "train.max_steps": 20, "train.log_every": 10,
                               "train.eval_every": 0, "train.ckpt_every": 0, "log.progress": False,
                               "log.tensorboard": False, "resume": "never"})
    cfg = load_config(PretrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in probe.items()])
    t0 = time.perf_counter()
    pretrain(cfg)
    records = [json.loads(line) for line in (out_dir / "calibration" / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    tokens_per_step = cfg.train.micro_batch_size * cfg.model.max_seq_len
    step_s = tokens_per_step / rates[-1] if rates else (time.perf_counter() - t0) / 20
    shutil.rmtree(out_dir / "calibration", ignore_errors=True)
    return max(50, int(seconds / (step_s * 1.15)))  # 15 %: evals and checkpoints


def quickstart(out_dir: Path, data: str | None = None, minutes: float = 2.0, seed: int = 1337) -> dict:
    from lmforge.infer import generate
    from lmforge.tokens.shards import write_shards
    from lmforge.tokens.tokenizer import train_bpe
    from lmforge.train.config import PretrainConfig
    from lmforge.train.pretrain import pretrain

    t0 = time.perf_counter()
    for stale in ("run", "calibration"):  # the demo always starts afresh
        shutil.rmtree(out_dir / stale, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs = [Path(data)] if data else stdlib_corpus()
    what = f"{data}" if data else f"{len(inputs)} Python standard-library modules"
    print(f"[1/4] training a byte-level BPE tokenizer on {what}")
    tok_dir = train_bpe(inputs, out_dir / "tokenizer", vocab_size=4096)
    print(f"[2/4] tokenizing into {out_dir / 'data'}")
    meta = write_shards(inputs, str(tok_dir), out_dir / "data", val_fraction=0.05)
    print(f"      train {meta['n_tokens']['train']:,} tokens, val {meta['n_tokens']['val']:,} tokens")

    items = {"data.dir": str(out_dir / "data"), "seed": seed, **DEMO_MODEL, **DEMO_TRAIN}
    budget = max(20.0, minutes * 60 - (time.perf_counter() - t0))
    steps = _steps_for_budget(items, out_dir, budget)
    items.update({"out_dir": str(out_dir / "run"), "train.max_steps": steps, "train.log_every": 25,
                  "train.eval_every": max(50, steps // 4), "train.ckpt_every": 0})
    cfg = load_config(PretrainConfig, None, [f"{k}={json.dumps(v)}" for k, v in items.items()])
    print(f"[3/4] pretraining a {cfg.model.num_layers}-layer, {cfg.model.hidden_size}-wide Llama for {steps} steps "
          f"(~{budget / 60:.1f} min)")
    summary = pretrain(cfg)
    print("[4/4] sampling from the trained model")
    prompt = "" if data else "def "  # the embedded corpus is Python; own data starts a fresh document
    sample = generate(summary["final_checkpoint"], prompt=prompt, max_new_tokens=80, temperature=0.8, top_k=50,
                      seed=seed)[0]

    (before, ppl0), (after, ppl1) = summary["first_val"], summary["last_val"]
    elapsed = time.perf_counter() - t0
    tokens = steps * summary["tokens_per_step"]
    print("\n" + "=" * 72)
    print(f"val perplexity: {ppl0:,.1f} before -> {ppl1:,.1f} after  (loss {before:.3f} -> {after:.3f})")
    print(f"sample:\n{sample}\n" + "-" * 72)
    print(f"tokenizer:  {tok_dir}")
    print(f"shards:     {out_dir / 'data'}  (train.bin, val.bin, meta.json)")
    print(f"run:        {out_dir / 'run'}  (config.yaml, metrics.jsonl, checkpoints/)")
    print(f"model:      {summary['final_checkpoint']}  (loads with AutoModelForCausalLM)")
    print(f"time:       {elapsed:.0f} s total, {summary['elapsed_s']:.0f} s training, "
          f"{tokens / summary['elapsed_s']:,.0f} tokens/s")
    print(f"next:       lmforge generate {out_dir / 'run'} 'import '")
    return {"summary": summary, "sample": sample, "elapsed_s": elapsed, "ppl_before": ppl0, "ppl_after": ppl1}


class QuickstartConfig(Strict):
    data: str | None = Field(None, description="your own .txt/.jsonl file or directory instead of the embedded corpus")
    out: Path | None = Field(None, description="output directory (None: runs/quickstart, with --full runs/quickstart-full)")
    minutes: float | None = Field(None, gt=0, description="time budget in minutes (None: 2 of training; with --full 9 "
                                                          "for every stage end to end)")
    seed: int = Field(1337, description="seeds the model, the data order and the sample")
    full: bool = Field(False, description="every stage: crawl, clean, tokenize, pretrain, SFT, DPO, eval, serve, report")

    @model_validator(mode="after")
    def _full_has_own_corpus(self):
        if self.full and self.data is not None:
            raise ValueError("--full builds its own corpus from the installed Python; drop --data")
        return self


def run_quickstart(cfg: QuickstartConfig) -> int:
    if cfg.full:
        from lmforge.quickstart.full import quickstart_full
        quickstart_full(out=cfg.out or Path("runs/quickstart-full"), minutes=cfg.minutes or 9.0, seed=cfg.seed)
    else:
        quickstart(out_dir=cfg.out or Path("runs/quickstart"), data=cfg.data, minutes=cfg.minutes or 2.0, seed=cfg.seed)
    return 0


COMMANDS = [
    Command("quickstart", "tokenizer + tokenize + pretrain + sample on an embedded corpus, in minutes; --full: every stage",
            lambda: QuickstartConfig, run_quickstart,
            description="Train a BPE tokenizer, tokenize, pretrain a small model on CPU for a few minutes, print val "
                        "perplexity before and after and a sample. Default corpus: the Python standard library's own "
                        "source files. --full runs every stage through its own command (crawl of the local pydoc "
                        "pages, data run, tokenize, pretrain, finetune, align DPO, eval, serve) and writes "
                        "OUT/report.md and OUT/report.png; a rerun continues from the finished stages."),
]
