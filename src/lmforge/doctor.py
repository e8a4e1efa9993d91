"""`lmforge doctor RUN_DIR [RUN_DIR ...]`: diagnose training runs from their metrics.jsonl, events and config.

Each check looks for one sign of trouble that troubleshooting practice knows (a loss that never falls, one
that explodes, validation rising while training falls, ...) and reports a `Finding` with its evidence (steps
and numbers) and the usual remedy. Thresholds are named constants below, each with the reason for its value.
Writes doctor.md and doctor.png (into --out, by default the first run directory) and exits 1 when a finding
reaches --fail-on (critical by default), so CI can gate on it; bad input is a one-line error (exit 2).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field

from lmforge.command import Command
from lmforge.config import Strict
from lmforge.errors import UserError

SEVERITIES = ("critical", "warning", "info")

TREND_FRACTION = 0.1  # head and tail of a curve are medians over 10 % of its lines (>= 3): one batch never decides
MIN_TREND_LINES = 10  # fewer logged steps say nothing about a trend yet
PLATEAU_DROP = 0.02  # a healthy loss falls by tens of percent early on; under 2 % over the run is no learning
DIVERGE_RISE = 0.10  # a loss that ends 10 % above its start went the wrong way
EXPLODE_FACTOR = 3.0  # no healthy optimiser step triples the loss
SPIKE_FACTOR, SPIKE_WINDOW = 1.5, 20  # batch noise stays within ~10 % of the last 20 losses' median; 50 % is not noise
SPIKE_MIN_HISTORY = 5  # a median of fewer losses is itself noise
GRAD_GROWTH = 10.0  # late-training drift in the norm (weight decay, LR decay) stays far below 10x
CLIP_TIGHT_RATIO = 10.0  # a median norm 10x the clip threshold scales every update down 10x or more
LR_FAR_ABOVE = 10.0  # 10x the usual peak LR for the size is beyond what published runs train stably with
LR_FAR_BELOW = 0.01  # 1/100 of it cannot move the loss in a run of ordinary length
# Usual peak pretraining LR by parameter count: GPT-3 Table 2.1 and nanoGPT's shakespeare-char (10.7M, 1e-3).
USUAL_PRETRAIN_LR = ((10.7e6, 1e-3), (125e6, 6e-4), (350e6, 3e-4), (760e6, 2.5e-4), (1.3e9, 2e-4),
                     (2.7e9, 1.6e-4), (6.7e9, 1.2e-4), (13e9, 1e-4), (175e9, 6e-5))
# Relative to it: LoRA trains at ~10x (Hu et al. 2021: 2e-4 at GPT-3 sizes), full preference/RL tuning at ~1/10.
LR_SCALE = {("finetune", "lora"): 10.0, ("finetune", "qlora"): 10.0, ("align", "full"): 0.1}
OVERFIT_RISE, MIN_EVALS = 0.05, 3  # val 5 % above its best (over >= 3 evals) is a trend, not eval noise
EPOCHS_WARN = 4.0  # up to ~4 epochs repeated data is worth nearly fresh data (Muennighoff et al. 2023)
THROUGHPUT_DROP = 0.5  # a rolling median under half the run's median is a slowdown, not jitter
THROUGHPUT_MIN_DROP_S = 10.0  # shorter dips are evals, checkpoints and other processes
LOW_MFU = 0.2  # tuned dense training reaches 0.35-0.55 (PaLM 0.46); under 0.2 the GPU mostly waits
LOW_GPU_UTIL = 50.0  # NVML percent of time a kernel ran: under half, the input pipeline or host syncs dominate
ACC_STUCK_BAND = 0.05  # preference accuracy within 0.05 of a coin flip (or of 0: ties) over the last quarter
ZERO_STD_WARN = 0.5  # equal rewards in a group give zero advantage: past half the groups, most compute is wasted
# KL exploding: last quarter above this (GRPO per token, healthy ~0.01-0.1; PPO per sequence, Ziegler steers to 6)
KL_HIGH = {"kl": 0.5, "objective/kl": 20.0}
KL_GROWTH = 10.0  # ... and 10x the first quarter's: the policy keeps walking away from the reference
SAMPLE_CHARS = 160  # decoded characters shown per sampled window
DOMINANT_TOKEN = 0.5  # one token that is half the sampled tokens: padding, a repeated document, a broken tokenizer


LINE_KINDS = {"loss", "val_loss", "event"}  # a metrics line is a train, eval or event line (DESIGN.md)


class DoctorError(UserError):
    """A run directory doctor cannot read (missing, no metrics.jsonl, nothing readable in it)."""


@dataclass
class Finding:
    """One sign of trouble in one run: how bad, what it is, the numbers that show it, what to do."""
    severity: Literal["critical", "warning", "info"]
    code: str
    title: str
    evidence: str
    remedy: str
    steps: tuple[int, int] | None = None
    samples: list[str] = field(default_factory=list)


@dataclass
class Run:
    """One run directory as doctor reads it: config, train/eval lines by step, events, unreadable lines."""
    path: Path
    config: dict
    train: list[dict]
    evals: list[dict]
    events: list[dict]
    bad_lines: list[int]
    findings: list[Finding] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """pretrain, finetune or align (from config.yaml's keys); unknown without a config."""
        if "algorithm" in self.config:
            return "align"
        if "base_model" in self.config:
            return "finetune"
        return "pretrain" if "data" in self.config and "model" in self.config else "unknown"

    @property
    def label(self) -> str:
        method = self.config.get("method")
        return " ".join(filter(None, [self.kind, self.config.get("algorithm")])) + (f", {method}" if method else "")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a train-line key, in step order; lines without it are left out."""
        pairs = [(r["step"], float(r[key])) for r in self.train if isinstance(r.get(key), (int, float))]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def setting(self, dotted: str):
        """config.yaml's value at a dotted key (`train.lr`), None when absent."""
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def read_run(path: Path) -> Run:
    """Read a run directory; DoctorError when it is not one. A step logged twice (resume, rollback) keeps its
    last line; unreadable lines are counted and named, not fatal."""
    path, metrics = Path(path), Path(path, "metrics.jsonl")
    if not metrics.is_file():
        what = "no metrics.jsonl" if path.is_dir() else "not a directory"
        raise DoctorError(f"{path}: {what}; give run directories (the out_dir of pretrain, finetune or align)")
    train, evals, events, bad = {}, {}, [], []
    for n, line in enumerate(metrics.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and LINE_KINDS & set(rec)):
            bad.append(n)
        elif "event" in rec:
            events.append(rec)
        else:
            (evals if "val_loss" in rec else train)[rec["step"]] = rec
    if not (train or evals or events):
        raise DoctorError(f"{metrics}: no readable metrics lines ({len(bad)} unreadable: lines {_few(bad)}); it "
                          "holds JSON objects with a step and a loss, val_loss or event")
    config = {}
    if (path / "config.yaml").is_file():
        import yaml
        try:
            config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as e:
            raise DoctorError(f"{path / 'config.yaml'}: not valid YAML ({' '.join(str(e).split())[:200]})") from None
    return Run(path, config if isinstance(config, dict) else {}, [train[s] for s in sorted(train)],
               [evals[s] for s in sorted(evals)], events, bad)


def _few(numbers: list[int]) -> str:
    """`4, 10, 12, ...`: the first ten numbers of a list."""
    return ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")


def _g(x: float) -> str:
    return f"{x:.4g}"


def _head_tail(values: list[float]) -> tuple[float, float, int]:
    """(median of the first TREND_FRACTION, median of the last, lines in each)."""
    k = max(3, int(len(values) * TREND_FRACTION))
    return statistics.median(values[:k]), statistics.median(values[-k:]), k


def _quarters(values: list[float]) -> tuple[float, float]:
    k = max(1, len(values) // 4)
    return statistics.median(values[:k]), statistics.median(values[-k:])


# ---- model size and the usual learning rate --------------------------------------------------------------

def n_params(run: Run) -> float | None:
    """Parameter count from the run's model shape: config.yaml's model section (pretrain) or an HF
    config.json (the latest checkpoint's, else the base model directory's); None when neither is at hand."""
    ckpts = run.path / "checkpoints"
    latest = ckpts / (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None
    found = [p / "config.json" for p in (latest, Path(str(run.config.get("base_model", ""))))
             if p is not None and (p / "config.json").is_file()]
    try:
        if run.kind == "pretrain":
            m = run.config["model"]
            h, layers, heads, kv, inter = (m["hidden_size"], m["num_layers"], m["num_heads"], m["num_kv_heads"],
                                           m["intermediate_size"])
            vocab, tied = m["vocab_size"], m["tie_embeddings"]
        elif found:
            c = json.loads(found[0].read_text())
            h, layers, heads, inter = (c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"],
                                       c["intermediate_size"])
            kv, vocab, tied = c.get("num_key_value_heads") or heads, c["vocab_size"], c.get("tie_word_embeddings", True)
        else:
            return None
        body = layers * (2 * h * h + 2 * h * (h // heads) * kv + 3 * h * inter)
        return body + vocab * h * (1 if tied else 2)
    except (KeyError, TypeError, ZeroDivisionError, ValueError):
        return None


def usual_lr(params: float, kind: str, method: str | None) -> float:
    """The usual peak LR for a model of `params` parameters trained this way (see USUAL_PRETRAIN_LR)."""
    table = USUAL_PRETRAIN_LR
    if params <= table[0][0]:
        lr = table[0][1]
    elif params >= table[-1][0]:
        lr = table[-1][1]
    else:
        (n0, lr0), (n1, lr1) = next((a, b) for a, b in zip(table, table[1:]) if a[0] <= params <= b[0])
        t = math.log(params / n0) / math.log(n1 / n0)
        lr = math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0)))
    return lr * LR_SCALE.get((kind, method or "full"), 1.0)


# ---- checks ---------------------------------------------------------------------------------------------

def check_loss(run: Run) -> list[Finding]:
    """Divergence, a plateau from the start (with its likely cause), spikes and non-finite losses."""
    if run.config.get("algorithm") in ("ppo", "grpo"):
        return []  # policy-gradient losses are not meant to fall; the reward checks cover these runs
    steps, all_losses = run.series("loss")
    out = []
    nonfinite = [s for s, v in zip(steps, all_losses) if not math.isfinite(v)]
    if nonfinite and steps and not math.isfinite(all_losses[-1]):
        out.append(Finding("critical", "loss_nonfinite", "loss is NaN/inf at the end of the run",
                           f"non-finite loss at {len(nonfinite)} of {len(steps)} logged steps ({_few(nonfinite)}), "
                           f"the last one ({steps[-1]}) included",
                           "lower train.lr, use bf16 rather than fp16, keep train.grad_clip at 1.0, and look for "
                           "corrupt data (guards.skip_nonfinite skips such steps)", (nonfinite[0], steps[-1])))
    pairs = [(s, v) for s, v in zip(steps, all_losses) if math.isfinite(v)]
    if len(pairs) < MIN_TREND_LINES:
        return out
    steps, losses = [s for s, _ in pairs], [v for _, v in pairs]
    first, last, k = _head_tail(losses)
    peak = max(losses)
    peak_step = steps[losses.index(peak)]
    if last > first * (1 + DIVERGE_RISE) or peak > first * EXPLODE_FACTOR:
        lr = max(run.series("lr")[1] or [float("nan")])
        out.append(Finding("critical", "loss_diverged", "loss diverged",
                           f"loss {_g(losses[0])} at step {steps[0]} ({_g(first)} over steps {steps[0]}-"
                           f"{steps[k - 1]}) -> peak {_g(peak)} at step {peak_step} -> {_g(last)} over the last {k} "
                           f"logged steps (peak lr {_g(lr)})",
                           "lower train.lr (by 3-10x), raise train.warmup_steps, keep train.grad_clip at 1.0; "
                           "guards.spike_factor skips outlier steps and rolls back when they repeat",
                           (steps[0], steps[-1])))
    elif first - last < PLATEAU_DROP * abs(first):
        out.append(_plateau(run, steps, losses, first, last, k))
    else:
        out += _spikes(steps, losses)  # a diverging run spikes all along: the divergence finding says it
    return out


def _plateau(run: Run, steps: list[int], losses: list[float], first: float, last: float, k: int) -> Finding:
    """The plateau finding, naming the likely cause: LR too low, clipping too tight, or the data."""
    causes = []
    lr = max(run.series("lr")[1] or [0.0])
    params = n_params(run)
    if params and lr and lr < LR_FAR_BELOW * usual_lr(params, run.kind, run.config.get("method")):
        usual = usual_lr(params, run.kind, run.config.get("method"))
        causes.append(f"LR too low: peak lr {_g(lr)} is {_g(lr / usual)}x the usual {_g(usual)} for "
                      f"{params / 1e6:.3g}M parameters")
    clip = run.setting("train.grad_clip")
    norms = run.series("grad_norm")[1]
    if clip and norms and statistics.median(norms) > CLIP_TIGHT_RATIO * clip:
        causes.append(f"clipping too tight: median grad norm {_g(statistics.median(norms))} against "
                      f"train.grad_clip {_g(clip)} scales every update down {_g(statistics.median(norms) / clip)}x")
    vocab = run.setting("model.vocab_size")
    if vocab and abs(last - math.log(vocab)) < 0.05 * math.log(vocab):
        causes.append(f"the loss sits at ln(vocab) = {_g(math.log(vocab))}: the model predicts no better than "
                      "uniform guessing")
    samples, data_note = sample_windows(run)
    if data_note:
        causes.append(data_note)
    if not any(c.startswith(("LR", "clipping")) for c in causes):
        causes.append("data or objective problems: check the decoded samples below (labels, masking, shuffling, "
                      "tokenizer)" if samples else "data or objective problems (labels, masking, shuffling, "
                      "tokenizer); the run's token shards are not at hand to show samples")
    # From scratch a flat loss means nothing is learnt; a tuned model's loss may start near its floor.
    return Finding("critical" if run.kind in ("pretrain", "unknown") else "warning", "loss_plateau",
                   "loss not decreasing",
                   f"loss {_g(first)} at steps {steps[0]}-{steps[k - 1]} -> {_g(last)} over the last {k} logged "
                   f"steps (down {100 * (first - last) / max(abs(first), 1e-12):.2f} %, under "
                   f"{100 * PLATEAU_DROP:g} %); "
                   + "; ".join(causes),
                   "raise train.lr toward the usual range, loosen train.grad_clip (1.0 is the usual), and check "
                   "the data: decode a few batches, make sure the labels are the inputs shifted by one",
                   (steps[0], steps[-1]), samples)


def _spikes(steps: list[int], losses: list[float]) -> list[Finding]:
    before = [(s, v, statistics.median(losses[max(0, i - SPIKE_WINDOW):i]))
              for i, (s, v) in enumerate(zip(steps, losses)) if i >= SPIKE_MIN_HISTORY]
    spikes = [(s, v, m) for s, v, m in before if v > SPIKE_FACTOR * m]
    if not spikes:
        return []
    worst = max(spikes, key=lambda t: t[1] / t[2])
    return [Finding("warning", "loss_spikes", f"{len(spikes)} loss spike{'s' * (len(spikes) > 1)}",
                    f"steps {_few([s for s, _, _ in spikes])}: "
                    f"loss over {SPIKE_FACTOR:g}x the median of the {SPIKE_WINDOW} steps before; worst at step "
                    f"{worst[0]}: {_g(worst[1])} against {_g(worst[2])}",
                    "lower train.lr or raise train.warmup_steps; set guards.spike_factor (e.g. 3) to skip such "
                    "updates; look for bad documents at those steps",
                    (spikes[0][0], spikes[-1][0]))]


def check_grad_norm(run: Run) -> list[Finding]:
    steps, norms = run.series("grad_norm")
    warmup = run.setting("train.warmup_steps") or 0
    pairs = [(s, v) for s, v in zip(steps, norms) if s > warmup and math.isfinite(v)]
    if len(pairs) < MIN_TREND_LINES:
        return []
    early, late = _quarters([v for _, v in pairs])
    if early <= 0 or late < GRAD_GROWTH * early:
        return []
    return [Finding("warning", "grad_norm_growth", "gradient norm growing",
                    f"median grad norm {_g(early)} in the first quarter after warmup (from step {pairs[0][0]}) -> "
                    f"{_g(late)} in the last quarter (to step {pairs[-1][0]}), {_g(late / early)}x",
                    "lower train.lr, keep train.grad_clip at 1.0, check train.weight_decay (0.1 is usual) and the "
                    "precision (bf16 over fp16); a growing norm often precedes a divergence",
                    (pairs[0][0], pairs[-1][0]))]


def check_lr(run: Run) -> list[Finding]:
    """No warmup, and a peak LR far above the usual one for the model size and method."""
    steps, lrs = run.series("lr")
    if not lrs:
        return []
    out = []
    warmup = run.setting("train.warmup_steps")
    no_warmup = warmup == 0 if warmup is not None else steps[0] == 1 and lrs[0] >= 0.9 * max(lrs)
    if no_warmup:  # from scratch Adam's first steps need it; tuning from trained weights often goes without
        out.append(Finding("warning" if run.kind in ("pretrain", "unknown") else "info", "no_warmup",
                           "no learning-rate warmup",
                           f"lr {_g(lrs[0])} at step {steps[0]} is already the peak {_g(max(lrs))}"
                           + (" (train.warmup_steps: 0)" if warmup == 0 else ""),
                           "set train.warmup_steps to ~1-5 % of the steps (Adam's moment estimates are noisy in "
                           "the first steps, and a full-size update then can throw the run off)",
                           (steps[0], steps[0])))
    params = n_params(run)
    if params and run.kind != "unknown":
        usual = usual_lr(params, run.kind, run.config.get("method"))
        peak = max(lrs)
        if round(peak / usual, 6) > LR_FAR_ABOVE:
            out.append(Finding("warning", "lr_too_high", "peak learning rate far above the usual range",
                               f"peak lr {_g(peak)} at step {steps[lrs.index(peak)]} is {_g(peak / usual)}x the "
                               f"usual {_g(usual)} for a {params / 1e6:.3g}M-parameter model ({run.label})",
                               f"lower train.lr toward {_g(usual)} (GPT-3's table by size; LoRA ~10x, preference "
                               "tuning ~1/10 of it)", (steps[0], steps[-1])))
    return out


def check_overfitting(run: Run) -> list[Finding]:
    evals = [e for e in run.evals if math.isfinite(e["val_loss"])]
    if len(evals) < MIN_EVALS:
        return []
    best = min(evals, key=lambda e: e["val_loss"])
    last = evals[-1]
    if best is last or best is evals[0] or last["val_loss"] < best["val_loss"] * (1 + OVERFIT_RISE):
        return []  # a validation loss that never improved is a divergence or plateau, not overfitting
    steps, losses = run.series("loss")
    if len(losses) < MIN_TREND_LINES:
        return []
    _, train_end, k = _head_tail(losses)
    near_best = [v for _, v in sorted(zip(steps, losses), key=lambda sv: abs(sv[0] - best["step"]))[:k]]
    if not train_end < statistics.median(near_best):
        return []
    rise = last["val_loss"] / best["val_loss"] - 1
    return [Finding("warning", "overfitting", "overfitting: validation loss rising while training loss falls",
                    f"val_loss {_g(best['val_loss'])} at step {best['step']} (best) -> {_g(last['val_loss'])} at "
                    f"step {last['step']} (+{100 * rise:.1f} %); train loss {_g(statistics.median(near_best))} -> "
                    f"{_g(train_end)} over the same steps",
                    f"keep the checkpoint nearest step {best['step']} (early stopping), train fewer epochs, add "
                    "data, or regularise (weight decay, dropout, a smaller model)", (best["step"], last["step"]))]


def train_tokens(run: Run) -> tuple[float, str] | None:
    """(training tokens in the run's data, where that number came from), or None when not at hand."""
    if run.kind == "pretrain":
        dirs = [run.setting("data.dir")] if run.setting("data.dir") else list(run.setting("data.mix") or {})
        total = 0
        try:
            for d in dirs:
                meta, bin_ = Path(d) / "meta.json", Path(d) / "train.bin"
                if meta.is_file():
                    total += json.loads(meta.read_text())["n_tokens"]["train"]
                elif bin_.is_file():
                    total += bin_.stat().st_size // 2  # nanoGPT's shards are uint16
                else:
                    return None
        except (ValueError, KeyError, TypeError, OSError):
            return None
        return (total, " + ".join(str(d) for d in dirs)) if total else None
    report = run.path / "data_report.json"
    try:
        r = json.loads(report.read_text()) if run.kind == "finetune" and report.is_file() else {}
        return (r["n_tokens"] * r["n_train"] / r["n_examples"], str(report)) if r.get("n_examples") else None
    except (ValueError, KeyError, TypeError):
        return None


def check_repetition(run: Run) -> list[Finding]:
    seen = run.series("tokens")[1]
    data = train_tokens(run) if seen else None
    if not data:
        return []
    epochs = seen[-1] / data[0]
    if epochs <= 1:
        return []
    severity = "warning" if epochs > EPOCHS_WARN else "info"
    return [Finding(severity, "data_repetition", f"data repeated: {epochs:.3g} epochs",
                    f"{seen[-1]:,.0f} tokens trained over {data[0]:,.0f} training tokens ({data[1]})",
                    "more (deduplicated) data, or fewer steps; past ~4 epochs each further pass is worth less "
                    "and the model starts memorising (watch the validation loss)", (run.train[0]["step"],
                                                                                    run.train[-1]["step"]))]


def check_throughput(run: Run) -> list[Finding]:
    steps, tps = run.series("tokens_per_sec")
    elapsed = dict(zip(*run.series("elapsed_s")))
    steps, tps = steps[1:], tps[1:]  # the first line holds start-up (allocation, compilation)
    w = max(3, len(tps) // 20)
    if len(tps) < 2 * w or not elapsed:
        return []
    base = statistics.median(tps)
    rolling = [statistics.median(tps[max(0, i - w + 1):i + 1]) for i in range(len(tps))]
    best, start = None, None
    for i, r in enumerate(rolling + [float("inf")]):
        if r < THROUGHPUT_DROP * base and start is None:
            start = i
        elif r >= THROUGHPUT_DROP * base and start is not None:
            span = (steps[start], steps[i - 1])
            seconds = elapsed.get(span[1], 0) - elapsed.get(steps[max(0, start - 1)], 0)
            if seconds >= THROUGHPUT_MIN_DROP_S and (best is None or seconds > best[1]):
                best = (span, seconds, statistics.median(tps[start:i]))
            start = None
    if best is None:
        return []
    (a, b), seconds, low = best
    ooms = [e["step"] for e in run.events if e["event"] == "oom" and e["step"] <= b]
    cause = f"; after the OOM backoff at step {ooms[-1]} (smaller micro-batches)" if ooms else ""
    return [Finding("warning", "throughput_drop", "throughput dropped",
                    f"tokens/s {_g(low)} over steps {a}-{b} ({seconds:.0f} s) against the run's median "
                    f"{_g(base)}{cause}",
                    "look for other jobs on the device, a slow or remote data disk, thermal throttling, or eval/"
                    "checkpoint stalls; after an OOM backoff start at the micro_batch_size that fits, or enable "
                    "train.grad_checkpointing", (a, b))]


def check_device(run: Run) -> list[Finding]:
    """Low MFU and low NVML utilisation (GPU runs log them; CPU runs do not)."""
    out = []
    for key, limit, scale, name in (("mfu", LOW_MFU, 1.0, "MFU"), ("gpu_util", LOW_GPU_UTIL, 0.01, "GPU utilisation")):
        steps, values = run.series(key)
        if len(values) >= 3 and statistics.median(values[1:]) < limit:
            m = statistics.median(values[1:])
            out.append(Finding("warning", f"low_{key}", f"low {name}",
                               f"median {name} {100 * m * scale:.1f} % over steps {steps[1]}-{steps[-1]} (under "
                               f"{100 * limit * scale:g} %)",
                               "raise train.micro_batch_size (or the sequence length) until memory is used, enable "
                               "train.compile, use bf16, and make sure data loading keeps up",
                               (steps[1], steps[-1])))
    return out


EVENT_FINDINGS = {  # event -> (severity, what it says, remedy)
    "stop": ("critical", "training stopped", "read the reason; lower train.lr or fix the data, then resume"),
    "rollback": ("warning", "rolled back to a checkpoint", "repeated bad steps: lower train.lr, raise warmup, "
                 "check the data at those steps"),
    "skip_nonfinite": ("warning", "updates skipped for a NaN/inf loss or gradient", "lower train.lr, use bf16 "
                       "rather than fp16, check the data at those steps"),
    "skip_spike": ("warning", "updates skipped as loss spikes", "lower train.lr or raise train.warmup_steps"),
    "oom": ("warning", "out-of-memory backoffs", "start at the micro_batch_size the backoff settled on, enable "
            "train.grad_checkpointing, or use LoRA/QLoRA (`lmforge plan memory` estimates what fits)"),
    "resumed": ("info", "resumed from a checkpoint", "none needed"),
    "world_size_changed": ("info", "resumed on a different number of processes", "none needed"),
    "nvml_unavailable": ("info", "no GPU memory/utilisation readings", "check the driver's NVML library"),
}


def check_events(run: Run) -> list[Finding]:
    out = []
    for name, (severity, title, remedy) in EVENT_FINDINGS.items():
        hits = [e for e in run.events if e.get("event") == name]
        if hits:
            details = "; ".join(f"step {e['step']}: {e.get('detail', '')}" for e in hits[:3])
            more = f" (+{len(hits) - 3} more)" if len(hits) > 3 else ""
            title += f", {len(hits)}x" if len(hits) > 1 else ""
            at = [e["step"] for e in hits]
            out.append(Finding(severity, name, title, details + more, remedy, (min(at), max(at))))
    return out


def check_alignment(run: Run) -> list[Finding]:
    """DPO/reward accuracies stuck at 0.5, GRPO zero-variance groups, reward up while KL explodes."""
    out = []
    for key in ("rewards/accuracies", "accuracy"):
        steps, acc = run.series(key)
        if len(acc) >= MIN_TREND_LINES:
            tail = acc[-max(1, len(acc) // 4):]
            mean = statistics.mean(tail)
            if abs(mean - 0.5) < ACC_STUCK_BAND or mean < ACC_STUCK_BAND:  # at 0: every pair ties (no margin)
                what = ("chosen is preferred no more often than by chance" if mean > ACC_STUCK_BAND else "chosen and "
                        "rejected score the same: identical answers, or a policy that has not moved")
                at = round(mean * 2) / 2
                out.append(Finding("critical", "accuracy_stuck", f"preference accuracy stuck at {at:g}",
                                   f"{key} {mean:.3f} on average over the last {len(tail)} logged steps (to step "
                                   f"{steps[-1]}): {what}", "check that chosen/rejected are not swapped or "
                                   "identical, that the reference is the policy's starting point, and raise "
                                   "train.lr or dpo.beta", (steps[-len(tail)], steps[-1])))
    steps, zero = run.series("frac_reward_zero_std")
    if zero and statistics.mean(zero) > ZERO_STD_WARN:
        every = min(zero) >= 1.0
        out.append(Finding("critical" if every else "warning", "zero_std_groups",
                           "every reward group has zero variance" if every else "most reward groups have zero "
                           "variance", f"frac_reward_zero_std {statistics.mean(zero):.2f} on average over steps "
                           f"{steps[0]}-{steps[-1]} (min {min(zero):.2f}): those groups have zero advantage and no "
                           "gradient", "raise grpo.num_generations or the sampling temperature, drop prompts that "
                           "are always or never solved, give the reward partial credit", (steps[0], steps[-1])))
    for kl_key, reward_key in (("kl", "reward"), ("objective/kl", "objective/scores")):
        steps, kl = run.series(kl_key)
        if len(kl) < MIN_TREND_LINES:
            continue
        early, late = _quarters(kl)
        if late <= KL_HIGH[kl_key] or late <= KL_GROWTH * max(early, 1e-3 * KL_HIGH[kl_key]):
            continue
        rewards = run.series(reward_key)[1]
        r0, r1 = _quarters(rewards) if len(rewards) >= 4 else (0.0, 0.0)
        hacking = r1 > r0
        evidence = (f"{kl_key} {_g(early)} in the first quarter -> {_g(late)} in the last (to step {steps[-1]})"
                    + (f", while {reward_key} rose {_g(r0)} -> {_g(r1)}" if hacking else ""))
        out.append(Finding("warning", "reward_hacking" if hacking else "kl_exploding",
                           "reward hacking signs: reward up, KL exploding" if hacking else "KL from the reference "
                           "exploding", evidence, "raise the KL penalty (grpo.beta, ppo.kl_coef or ppo.target_kl), "
                           "lower train.lr, and read samples for exploits of the reward (length, repetition, format)",
                           (steps[0], steps[-1])))
    return out


def check_input(run: Run) -> list[Finding]:
    out = []
    if run.bad_lines:
        out.append(Finding("warning", "unreadable_lines", f"{len(run.bad_lines)} unreadable metrics lines skipped",
                           f"metrics.jsonl lines {_few(run.bad_lines)} (not JSON objects with a step and a "
                           "loss, val_loss or event)", "a run killed mid-write leaves a torn last line; others "
                           "point to a file edited or written by another tool"))
    if not run.config:
        out.append(Finding("info", "no_config", "no config.yaml", f"{run.path} has no readable config.yaml: checks "
                           "that need the run's settings (warmup, model size, data) are skipped", "none needed"))
    if not run.train:
        out.append(Finding("info", "no_train_lines", "no train lines", "metrics.jsonl holds no train lines yet",
                           "let the run log (train.log_every) before diagnosing it"))
    return out


CHECKS = (check_input, check_events, check_loss, check_grad_norm, check_lr, check_overfitting, check_repetition,
          check_throughput, check_device, check_alignment)


def diagnose(run: Run) -> list[Finding]:
    """Every check's findings for one run, most severe first."""
    findings = [f for check in CHECKS for f in check(run)]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


def sample_windows(run: Run, n: int = 3) -> tuple[list[str], str | None]:
    """A few decoded training windows from the run's token shards (when present and a tokenizer is named),
    and a note when one token dominates them; ([], None) otherwise."""
    data_dir = run.setting("data.dir")
    meta_path = Path(str(data_dir), "meta.json") if data_dir else None
    if meta_path is None or not meta_path.is_file():
        return [], None
    from tokenizers import Tokenizer

    from lmforge.tokens.shards import load_shard, read_meta

    try:
        tokenizer = Path(str(read_meta(data_dir).get("tokenizer")), "tokenizer.json")
        tokens = load_shard(data_dir, "train")
        tok = Tokenizer.from_file(str(tokenizer)) if tokenizer.is_file() and len(tokens) else None
    except (UserError, OSError) as e:
        return [], f"the token shards at {data_dir} cannot be read ({e})"
    if tok is None:
        return [], None
    length = min(run.setting("data.seq_len") or run.setting("model.max_seq_len") or 64, len(tokens))
    windows = [[int(t) for t in tokens[start:start + length]]
               for start in ((k + 1) * (len(tokens) - length) // (n + 1) for k in range(n))]
    texts = [tok.decode(w, skip_special_tokens=False)[:SAMPLE_CHARS] for w in windows]
    flat = [t for w in windows for t in w]
    top = max(set(flat), key=flat.count)
    share = flat.count(top) / len(flat)
    note = (f"one token ({tok.id_to_token(top)!r}) is {100 * share:.0f} % of the sampled tokens: padding, a "
            "repeated document or a broken tokenizer" if share > DOMINANT_TOKEN else None)
    return texts, note


# ---- report ---------------------------------------------------------------------------------------------

def _span(f: Finding) -> str:
    return f"step {f.steps[0]}" if f.steps[0] == f.steps[1] else f"steps {f.steps[0]}-{f.steps[1]}"


def markdown(runs: list[Run], plot: str | None) -> str:
    counts = {s: sum(f.severity == s for r in runs for f in r.findings) for s in SEVERITIES}
    lines = ["# lmforge doctor", "", ", ".join(f"{n} {s}" for s, n in counts.items()) + f" in {len(runs)} run"
             + ("s" * (len(runs) > 1)), ""]
    if plot:
        lines += [f"![loss, val loss, lr, grad norm, throughput]({plot})", ""]
    for run in runs:
        last = run.train[-1]["step"] if run.train else 0
        n_ev = len(run.events)
        lines += [f"## {run.path}", "", f"{run.label}; {last} steps logged, {len(run.evals)} evals, {n_ev} "
                  f"event{'s' * (n_ev != 1)}", ""]
        if not run.findings:
            lines += ["No findings.", ""]
        for f in run.findings:
            lines += [f"### {f.severity.upper()}: {f.title}" + (f" ({_span(f)})" if f.steps else ""), "",
                      f"- evidence: {f.evidence}", f"- remedy: {f.remedy}", ""]
            if f.samples:
                lines += ["Decoded training windows:", "", "```"] + [repr(s) for s in f.samples] + ["```", ""]
    return "\n".join(lines)


PANELS = (("loss", "train loss"), ("val_loss", "val loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"),
          ("tokens_per_sec", "tokens/s"))
LOG_PANELS = ("loss", "val_loss", "lr", "grad_norm")
EXTRA_PANEL = ("rewards/accuracies", "accuracy", "frac_reward_zero_std", "kl", "objective/kl", "reward", "mfu",
               "gpu_util", "mem_gb")


def plot(runs: list[Run], path: Path) -> None:
    """doctor.png: one panel per quantity, the runs overlaid, events marked on the loss panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    extra = next((k for k in EXTRA_PANEL if any(r.series(k)[1] for r in runs)), None)
    panels = list(PANELS) + ([(extra, extra)] if extra else [])
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    names = [r.path.name for r in runs]
    for ax, (key, title) in zip(axes.flat, panels):
        drawn = []
        for i, run in enumerate(runs):
            if key == "val_loss":
                xs, ys = [e["step"] for e in run.evals], [e["val_loss"] for e in run.evals]
            else:
                xs, ys = run.series(key)
            label = names[i] if names.count(names[i]) == 1 else str(run.path)
            drawn += [y for y in ys if math.isfinite(y)]
            ax.plot(xs, ys, marker="o" if key == "val_loss" else None, markersize=3, label=label, color=f"C{i}")
            if key == "loss":
                for e in run.events:
                    if e["event"] in ("rollback", "skip_nonfinite", "skip_spike", "oom", "stop"):
                        ax.axvline(e["step"], color=f"C{i}", linestyle=":", alpha=0.6)
        if key in LOG_PANELS and drawn and min(drawn) > 0:
            ax.set_yscale("log")  # a diverged run's curve would flatten every other one
        ax.set_title(title + (" (dotted: skips, rollbacks, OOM)" if key == "loss" else ""), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class DoctorConfig(Strict):
    runs: list[Path] = Field(min_length=1, description="run directories (the out_dir of pretrain, finetune or "
                                                       "align); several are diagnosed one by one, overlaid in the plot")
    out: Path | None = Field(None, description="directory for doctor.md and doctor.png (default: the first run "
                                               "directory)")
    fail_on: Literal["critical", "warning", "never"] = Field("critical", description="exit with status 1 when a "
                                                             "finding of this severity or worse is reported")


def doctor(cfg: DoctorConfig) -> tuple[list[Run], list[Path]]:
    """Read and diagnose every run, write doctor.md and doctor.png (when there is a curve to draw); returns the
    runs (with findings) and the files written."""
    runs = [read_run(p) for p in cfg.runs]
    for run in runs:
        run.findings = diagnose(run)
    out = Path(cfg.out or cfg.runs[0])
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "doctor.md"]
    if any(r.train or r.evals for r in runs):
        written.append(out / "doctor.png")
        plot(runs, written[1])
    written[0].write_text(markdown(runs, "doctor.png" if len(written) > 1 else None))
    return runs, written


def run_doctor(cfg: DoctorConfig) -> int:
    """The command: findings on the console, the report's paths, and the exit status (1 at --fail-on)."""
    runs, written = doctor(cfg)
    for run in runs:
        print(f"{run.path} ({run.label}): {len(run.findings) or 'no'} finding{'s' * (len(run.findings) != 1)}")
        for f in run.findings:
            print(f"  {f.severity.upper():8} {f.title}" + (f" ({_span(f)})" if f.steps else ""), f.evidence,
                  *[f"sample: {s!r}" for s in f.samples], f"remedy: {f.remedy}", sep="\n" + " " * 11)
    print("wrote " + " and ".join(map(str, written)))
    gate = SEVERITIES[:SEVERITIES.index(cfg.fail_on) + 1] if cfg.fail_on != "never" else ()
    return 1 if any(f.severity in gate for r in runs for f in r.findings) else 0


COMMANDS = [Command("doctor", "diagnose runs from metrics.jsonl: findings with evidence and remedies, doctor.md/png",
                    config=lambda: DoctorConfig, run=run_doctor, positionals=("runs",),
                    description="Diagnose training runs (pretrain, finetune, align) from their metrics.jsonl, "
                                "events and config.yaml: loss plateaus and divergence, spikes, NaN skips, rollbacks, "
                                "LR schedule mistakes, overfitting, data repetition, throughput and MFU, OOM "
                                "backoffs, and for DPO/GRPO/PPO accuracy at chance, zero-variance reward groups and "
                                "reward hacking. Writes doctor.md and doctor.png to --out (default: the first run "
                                "directory). Exit status: 0 healthy, 1 a finding at --fail-on (critical by "
                                "default), 2 bad input.")]
