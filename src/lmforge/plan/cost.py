"""`lmforge plan cost`: training FLOPs, GPU-hours, wall time and dollars; serving cost per million tokens; and an
API-vs-self-host breakeven that counts how many replicas a daily volume needs, not only the price per token.

Formulas only (no torch), so it prints in well under a second. The guide's cost scenarios (7B on 1T tokens, 70B on
2T tokens, on A100s) and its `calculate_breakeven` example are `lmforge plan cost guide`, the default.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from lmforge.config import Strict
from lmforge.errors import UserError
from lmforge.model.config import PRESETS, ModelConfig, flops_per_token, n_params
from lmforge.plan.cost_sources import (GPUS, Gpu, Throughput, bench_throughput, find_gpu, load_prices, metrics_throughput,
                                       run_mfu)

SECONDS_PER_DAY = 86_400
COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbt]?)\s*$", re.IGNORECASE)
SCALE = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


class CostError(UserError):
    """Settings that give no answer (e.g. serving cost without any throughput); one line naming the flag."""


def parse_count(value) -> int:
    """A positive token count from 1000000, 1e12, "300B" or "1T" (k, M, B, T: thousand, million, billion, trillion)."""
    if isinstance(value, bool):
        raise ValueError("expected a token count like 1T, 300B or 2e12")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        m = COUNT.match(str(value))
        if not m:
            raise ValueError("expected a positive token count like 1T, 300B or 2e12")
        number = float(m.group(1)) * SCALE[m.group(2).lower()]
    if not number > 0 or math.isinf(number):
        raise ValueError("a token count must be positive and finite")
    return round(number)


class PlanCostConfig(Strict):
    """`lmforge plan cost [guide|train|serve|breakeven]`: one flat set of keys; each mode reads the ones it needs."""

    what: Literal["guide", "train", "serve", "breakeven"] = Field(
        "guide", description="guide: the guide's scenarios and breakeven, recomputed; train: one training run; "
                             "serve: cost per million generated tokens; breakeven: API vs self-hosting at a volume")
    gpu: str = Field("a100-80gb", description="catalogue GPU (a100-40gb, a100-80gb, h100-80gb, h200-141gb, l4-24gb, "
                                              "or one a prices YAML adds)")
    prices: Path | None = Field(None, description="YAML that overrides or adds GPUs: gpus: {NAME: {usd_per_hour: X, "
                                                  "peak_tflops: Y}} (see configs/plan/cost_prices.yaml)")
    model: str = Field("7b", description="model preset whose shape sets N, layers and width (tiny ... 70b)")
    vocab_size: int = Field(32000, gt=0, description="vocabulary (the output head's FLOPs); Llama-2's by default")
    seq_len: int | None = Field(None, gt=0, description="training sequence length (the attention term); default "
                                                        "the preset's max_seq_len")
    tokens: int = Field(1_000_000_000_000, description="training tokens: 1T, 300B, 2e12 ...")
    mfu: float = Field(0.4, gt=0, le=1, description="assumed model FLOPs utilisation (measured: --run)")
    run: Path | None = Field(None, description="a run directory: use the median `mfu` of its metrics.jsonl")
    gpus: int = Field(1024, gt=0, description="GPUs the training run uses (wall time follows)")
    days: float | None = Field(None, gt=0, description="target wall time in days: GPUs needed (replaces --gpus)")
    tokens_per_sec: float | None = Field(None, gt=0, description="assumed generated tokens/s of one serving replica")
    bench: Path | None = Field(None, description="bench/serve_cpu.py --json output: its best lmforge tokens/s")
    metrics_url: str | None = Field(None, description="a running lmforge serve's /metrics on this machine "
                                                      "(http://127.0.0.1:PORT/metrics): tokens/s while it is loaded")
    scrape_s: float = Field(10.0, gt=0, description="seconds between the two /metrics reads")
    gpus_per_replica: int = Field(1, gt=0, description="GPUs one serving replica occupies")
    api_price: float = Field(2.0, gt=0, description="API price in $ per million tokens")
    daily_tokens: int | None = Field(None, description="tokens per day to serve (breakeven): 5M, 2e8 ...")
    json_out: bool = Field(False, description="print one JSON object instead of the text")

    @field_validator("tokens", "daily_tokens", mode="before")
    @classmethod
    def _count(cls, v):
        return None if v is None else parse_count(v)


# ---- training -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainCost:
    """One training run priced: FLOPs, GPU-hours at an MFU, wall time on a GPU count, and dollars."""
    model: str
    n_params: int
    tokens: int
    seq_len: int
    flops_6nd: float
    flops: float
    attention_share: float
    gpu: str
    usd_per_gpu_hour: float
    mfu: float
    mfu_source: str
    gpu_hours: float
    gpus: int
    days: float
    usd: float


def train_cost(model: str, tokens: int, gpu: Gpu, mfu: float, gpus: int = 1, days: float | None = None,
               seq_len: int | None = None, vocab_size: int = 32000, mfu_source: str = "assumed") -> TrainCost:
    """Price training `model` (a preset) on `tokens`: GPUs given -> days, or days given -> GPUs (rounded up)."""
    if model not in PRESETS:
        raise CostError(f"unknown model {model!r}; choose a preset: {', '.join(PRESETS)}")
    shape = ModelConfig(preset=model, vocab_size=vocab_size)
    seq = seq_len or shape.max_seq_len
    n = n_params(shape)
    per_token = flops_per_token(n, shape.num_layers, shape.hidden_size, seq, vocab_size)
    flops = per_token * tokens
    gpu_hours = flops / (gpu.peak_flops * mfu) / 3600
    if days is not None:
        gpus = math.ceil(gpu_hours / (days * 24))
    days = gpu_hours / gpus / 24
    return TrainCost(model=model, n_params=n, tokens=tokens, seq_len=seq, flops_6nd=6 * n * tokens, flops=flops,
                     attention_share=12 * shape.num_layers * shape.hidden_size * seq / per_token, gpu=gpu.name,
                     usd_per_gpu_hour=gpu.usd_per_hour, mfu=mfu, mfu_source=mfu_source, gpu_hours=gpu_hours,
                     gpus=gpus, days=days, usd=gpu_hours * gpu.usd_per_hour)


# ---- serving and breakeven ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServeCost:
    """One replica's price per day and per million generated tokens at full load."""
    gpu: str
    gpus_per_replica: int
    usd_per_day: float
    tokens_per_sec: float
    throughput_source: str
    tokens_per_day: float
    usd_per_million: float


def serve_cost(gpu: Gpu, gpus_per_replica: int, throughput: Throughput) -> ServeCost:
    """Cost per million tokens of one replica kept busy around the clock at `throughput`."""
    per_day = gpu.usd_per_hour * gpus_per_replica * 24
    capacity = throughput.tokens_per_sec * SECONDS_PER_DAY
    return ServeCost(gpu=gpu.name, gpus_per_replica=gpus_per_replica, usd_per_day=per_day,
                     tokens_per_sec=throughput.tokens_per_sec, throughput_source=throughput.source,
                     tokens_per_day=capacity, usd_per_million=per_day / capacity * 1e6)


def price_only_breakeven(usd_per_day: float, api_usd_per_million: float) -> float:
    """Tokens/day at which a fixed daily cost equals the API bill: what the guide's calculate_breakeven computes."""
    return usd_per_day / api_usd_per_million * 1e6


@dataclass(frozen=True)
class Breakeven:
    """API vs self-hosting with capacity counted: replicas are whole, and each serves tokens_per_day at most."""
    api_usd_per_million: float
    replica_usd_per_day: float
    replica_tokens_per_day: float
    price_only_tokens_per_day: float
    tokens_per_day: float | None  # the first volume at which self-hosting is cheaper; None: never
    daily_tokens: int | None
    replicas: int | None
    api_usd_per_day: float | None
    self_host_usd_per_day: float | None
    cheaper: str | None


def breakeven(serve: ServeCost, api_usd_per_million: float, daily_tokens: int | None = None) -> Breakeven:
    """Where self-hosting beats the API, with replicas = ceil(volume / one replica's daily capacity).

    The price-only volume is a breakeven only when one replica can serve it; when a replica's full-load cost per
    million is at or above the API price, no volume breaks even (each replica added costs more than it saves)."""
    price_only = price_only_breakeven(serve.usd_per_day, api_usd_per_million)
    wins = serve.usd_per_million < api_usd_per_million
    at = price_only if wins else None  # wins implies price_only < one replica's capacity
    replicas = api = own = cheaper = None
    if daily_tokens is not None:
        replicas = math.ceil(daily_tokens / serve.tokens_per_day)
        api = daily_tokens / 1e6 * api_usd_per_million
        own = replicas * serve.usd_per_day
        cheaper = "equal" if math.isclose(own, api) else "self-host" if own < api else "api"
    return Breakeven(api_usd_per_million=api_usd_per_million, replica_usd_per_day=serve.usd_per_day,
                     replica_tokens_per_day=serve.tokens_per_day, price_only_tokens_per_day=price_only,
                     tokens_per_day=at, daily_tokens=daily_tokens,
                     replicas=replicas, api_usd_per_day=api, self_host_usd_per_day=own, cheaper=cheaper)


# ---- the guide ----------------------------------------------------------------------------------------------------

GUIDE_SCENARIOS = (("7b", 1_000_000_000_000), ("70b", 2_000_000_000_000))
# A measured anchor for the MFU assumption: Meta's A100-80GB GPU-hours for Llama 2, 2T tokens at sequence 4096
# (Touvron et al. 2023, Table 2). The presets are those shapes, so flops / (peak x hours) is the MFU Meta reached.
LLAMA2_GPU_HOURS = {"7b": 184_320, "70b": 1_720_320}
# The guide's calculate_breakeven example: a self-hosted model at a fixed $7.00 a day against an API at $0.002 per
# 1K tokens ($2 per million). Its formula (daily cost / API price per token) gives 3,500,000 tokens/day; the text
# prints "Breakeven at 3,333,333 tokens/day" (what $6.67 a day, i.e. $200 a 30-day month, would give).
GUIDE_BREAKEVEN = {"usd_per_day": 7.0, "api_usd_per_million": 2.0, "printed": "Breakeven at 3,333,333 tokens/day"}
# Throughputs the guide's example is checked at when no measurement is given.
GUIDE_THROUGHPUTS = (
    Throughput(20.0, "assumed: one slow stream"),
    Throughput(3_500_000 / SECONDS_PER_DAY, "assumed: exactly the guide's 3.5M tokens/day on one replica"),
    Throughput(160.6, "measured: lmforge serve, SmolLM2-135M, 2 CPU cores, concurrency 8, bench/RESULTS.md"),
)


@dataclass(frozen=True)
class GuideReport:
    """The guide's scenarios and breakeven example, recomputed."""
    scenarios: list[TrainCost]
    breakeven_printed: str
    breakeven_formula_tokens_per_day: float
    capacity: list[Breakeven]
    throughput_sources: list[str]
    llama2_implied_mfu: dict[str, float]


def guide_report(gpu: Gpu, mfu: float, gpus: int, throughputs: list[Throughput], mfu_source: str = "assumed"
                 ) -> GuideReport:
    """The 7B/1T and 70B/2T runs on `gpu` at `mfu`, and the guide's breakeven with capacity counted."""
    scenarios = [train_cost(m, d, gpu, mfu, gpus=gpus, mfu_source=mfu_source) for m, d in GUIDE_SCENARIOS]
    day, api = GUIDE_BREAKEVEN["usd_per_day"], GUIDE_BREAKEVEN["api_usd_per_million"]
    rows = []
    for t in throughputs:
        replica = serve_cost(Gpu("the guide's self-hosted model", day / 24, 0.0), 1, t)
        rows.append(breakeven(replica, api, daily_tokens=round(price_only_breakeven(day, api))))
    a100 = GPUS["a100-80gb"]
    implied = {m: train_cost(m, 2_000_000_000_000, a100, 1.0, gpus=1).gpu_hours / hours
               for m, hours in LLAMA2_GPU_HOURS.items()}
    return GuideReport(scenarios=scenarios, breakeven_printed=GUIDE_BREAKEVEN["printed"],
                       breakeven_formula_tokens_per_day=price_only_breakeven(day, api), capacity=rows,
                       throughput_sources=[t.source for t in throughputs], llama2_implied_mfu=implied)


# ---- text ---------------------------------------------------------------------------------------------------------

def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def train_text(c: TrainCost) -> list[str]:
    return [
        f"{c.model} ({_count(c.n_params)} non-embedding params) on {_count(c.tokens)} tokens, seq {c.seq_len}:",
        f"  FLOPs       {c.flops:.3e}  (6ND {c.flops_6nd:.3e}; attention {c.attention_share:.1%} of the total)",
        f"  GPU-hours   {c.gpu_hours:,.0f} {c.gpu} at MFU {c.mfu:.0%} ({c.mfu_source})",
        f"  wall time   {c.days:,.1f} days on {c.gpus:,} GPUs",
        f"  cost        ${c.usd:,.0f} at ${c.usd_per_gpu_hour:.2f}/GPU-hour",
    ]


def serve_text(s: ServeCost) -> list[str]:
    return [
        f"one replica: {s.gpus_per_replica} x {s.gpu}, ${s.usd_per_day:,.2f}/day",
        f"  throughput  {s.tokens_per_sec:,.1f} generated tokens/s ({s.throughput_source})",
        f"  capacity    {s.tokens_per_day:,.0f} tokens/day at full load",
        f"  cost        ${s.usd_per_million:,.2f} per million tokens at full load (more when it idles)",
    ]


def breakeven_text(b: Breakeven) -> list[str]:
    lines = [f"API ${b.api_usd_per_million:g}/M tokens vs a replica at ${b.replica_usd_per_day:,.2f}/day serving up "
             f"to {b.replica_tokens_per_day:,.0f} tokens/day:",
             f"  price-only breakeven (the guide's formula): {b.price_only_tokens_per_day:,.0f} tokens/day"]
    full_load = b.replica_usd_per_day / b.replica_tokens_per_day * 1e6
    if b.tokens_per_day is None:
        lines.append(f"  with capacity: never; a replica at full load costs ${full_load:,.2f}/M, not less than the "
                     f"API's ${b.api_usd_per_million:g}/M (the price-only volume needs "
                     f"{math.ceil(b.price_only_tokens_per_day / b.replica_tokens_per_day)} replica(s))")
    else:
        lines.append(f"  with capacity: {b.tokens_per_day:,.0f} tokens/day; k replicas are cheaper than the API "
                     f"from k x {b.tokens_per_day:,.0f} to k x {b.replica_tokens_per_day:,.0f} tokens/day (the API "
                     f"wins in any gap between those ranges)")
    if b.daily_tokens is not None:
        verdict = "the same cost" if b.cheaper == "equal" else f"{b.cheaper} is cheaper"
        lines.append(f"  at {b.daily_tokens:,} tokens/day: {b.replicas} replica(s) ${b.self_host_usd_per_day:,.2f}/day"
                     f" vs API ${b.api_usd_per_day:,.2f}/day -> {verdict}")
    return lines


def guide_text(g: GuideReport) -> list[str]:
    lines = ["The guide's training scenarios, recomputed (FLOPs = 6·N·D + 12·L·h·s·D):"]
    for c in g.scenarios:
        lines += train_text(c)
    lines.append("Check of the MFU assumption: Meta's reported A100-80GB hours for Llama 2 on 2T tokens imply MFU "
                 + ", ".join(f"{m} {mfu:.1%} ({LLAMA2_GPU_HOURS[m]:,} h)" for m, mfu in g.llama2_implied_mfu.items()))
    lines += ["", f"The guide's calculate_breakeven example prints \"{g.breakeven_printed}\"; its own formula "
                  f"(${GUIDE_BREAKEVEN['usd_per_day']:.2f}/day / ${GUIDE_BREAKEVEN['api_usd_per_million']:g} per "
                  f"million) gives {g.breakeven_formula_tokens_per_day:,.0f} tokens/day.",
              "It ignores throughput: a replica serves tokens_per_sec x 86,400 tokens a day at most."]
    for b, source in zip(g.capacity, g.throughput_sources):
        lines += [f"at {b.replica_tokens_per_day / SECONDS_PER_DAY:,.1f} tokens/s ({source}):"] + breakeven_text(b)
    return lines


# ---- command ------------------------------------------------------------------------------------------------------

def _throughput(cfg: PlanCostConfig) -> Throughput | None:
    given = [k for k in ("tokens_per_sec", "bench", "metrics_url") if getattr(cfg, k) is not None]
    if len(given) > 1:
        raise CostError(f"give one of --tokens-per-sec, --bench, --metrics-url, not {' and '.join(given)}")
    if cfg.bench is not None:
        return bench_throughput(cfg.bench)
    if cfg.metrics_url is not None:
        return metrics_throughput(cfg.metrics_url, cfg.scrape_s)
    if cfg.tokens_per_sec is not None:
        return Throughput(cfg.tokens_per_sec, "assumed")
    return None


def plan_cost(cfg: PlanCostConfig) -> dict:
    """The report of one `lmforge plan cost` call, as JSON-ready data (the text is printed from it)."""
    gpu = find_gpu(load_prices(cfg.prices), cfg.gpu)
    mfu, mfu_source = (run_mfu(cfg.run), f"measured: {cfg.run}") if cfg.run is not None else (cfg.mfu, "assumed")
    if cfg.what == "train":
        return {"train": train_cost(cfg.model, cfg.tokens, gpu, mfu, gpus=cfg.gpus, days=cfg.days,
                                    seq_len=cfg.seq_len, vocab_size=cfg.vocab_size, mfu_source=mfu_source)}
    throughput = _throughput(cfg)
    if cfg.what == "guide":
        throughputs = [throughput] if throughput else list(GUIDE_THROUGHPUTS)
        return {"guide": guide_report(gpu, mfu, cfg.gpus, throughputs, mfu_source=mfu_source)}
    if throughput is None:
        raise CostError(f"plan cost {cfg.what} needs a throughput: --tokens-per-sec N, --bench FILE.json or "
                        f"--metrics-url http://127.0.0.1:PORT/metrics")
    serve = serve_cost(gpu, cfg.gpus_per_replica, throughput)
    if cfg.what == "serve":
        return {"serve": serve}
    return {"serve": serve, "breakeven": breakeven(serve, cfg.api_price, cfg.daily_tokens)}


def plan_cost_main(cfg: PlanCostConfig) -> int:
    """Print the report as text, or as one JSON object with --json."""
    report = plan_cost(cfg)
    if cfg.json_out:
        print(json.dumps({k: asdict(v) for k, v in report.items()}, indent=1))
        return 0
    lines: list[str] = []
    for key, value in report.items():
        text = {"train": train_text, "serve": serve_text, "breakeven": breakeven_text, "guide": guide_text}[key]
        lines += text(value)
    print("\n".join(lines))
    return 0
