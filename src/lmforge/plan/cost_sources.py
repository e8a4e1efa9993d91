"""Where `lmforge plan cost` gets its inputs: the GPU price catalogue (overridable in YAML), a run's measured MFU,
and serving throughput measured by bench/serve_cpu.py's JSON or a running server's Prometheus /metrics."""
from __future__ import annotations

import ipaddress
import json
import statistics
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

from lmforge.errors import UserError


class CostInputError(UserError):
    """A price file, run directory, bench JSON or /metrics URL that cannot be used; one line naming it."""


@dataclass(frozen=True)
class Gpu:
    """One catalogue entry: rental price per GPU-hour and dense bf16 peak FLOP/s (what MFU is measured against)."""
    name: str
    usd_per_hour: float
    peak_flops: float


# Prices are assumptions, not quotes: round on-demand rates per GPU-hour of the kind public cloud price pages
# (Lambda, RunPod, CoreWeave; AWS/GCP/Azure list prices run higher) showed in 2024-2025. They move every
# quarter: put your own in a prices YAML (configs/plan/cost_prices.yaml). Peak FLOP/s are NVIDIA's dense bf16
# figures, the same ones lmforge.train.metrics.PEAK_BF16_FLOPS measures MFU against (a test keeps them equal).
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("a100-40gb", 1.29, 312e12),
    Gpu("a100-80gb", 1.79, 312e12),
    Gpu("h100-80gb", 2.99, 989e12),
    Gpu("h200-141gb", 3.79, 989e12),
    Gpu("l4-24gb", 0.80, 121e12),
)}


def load_prices(path: Path | None) -> dict[str, Gpu]:
    """The catalogue with a prices YAML applied: `gpus: {name: {usd_per_hour: X, peak_tflops: Y}}`; a new name
    needs both, a known one may change either."""
    catalogue = dict(GPUS)
    if path is None:
        return catalogue
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise CostInputError(f"prices file {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise CostInputError(f"prices file {path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("gpus"), dict) or set(data) != {"gpus"}:
        raise CostInputError(f"prices file {path}: expected one key `gpus:` mapping names to "
                             f"{{usd_per_hour: X, peak_tflops: Y}}")
    for name, entry in data["gpus"].items():
        known = catalogue.get(str(name))
        if not isinstance(entry, dict) or not set(entry) <= {"usd_per_hour", "peak_tflops"} or not entry:
            raise CostInputError(f"prices file {path}: gpus.{name}: give usd_per_hour and/or peak_tflops")
        if known is None and set(entry) != {"usd_per_hour", "peak_tflops"}:
            raise CostInputError(f"prices file {path}: gpus.{name} is not in the catalogue, so it needs both "
                                 f"usd_per_hour and peak_tflops")
        for key, value in entry.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise CostInputError(f"prices file {path}: gpus.{name}.{key} must be a positive number "
                                     f"(got {value!r})")
        price = float(entry.get("usd_per_hour", known.usd_per_hour if known else 0))
        peak = float(entry["peak_tflops"]) * 1e12 if "peak_tflops" in entry else known.peak_flops
        catalogue[str(name)] = Gpu(str(name), price, peak)
    return catalogue


def find_gpu(catalogue: dict[str, Gpu], name: str) -> Gpu:
    """The catalogue entry called `name`; a one-line error listing the names otherwise."""
    if name not in catalogue:
        raise CostInputError(f"unknown gpu {name!r}; choose one of {', '.join(catalogue)} (or add it in a "
                             f"prices YAML)")
    return catalogue[name]


def run_mfu(run_dir: Path) -> float:
    """The median `mfu` of a run's metrics.jsonl train lines (logged on GPUs whose peak FLOP/s is known)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise CostInputError(f"run {run_dir}: no metrics.jsonl there")
    values = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise CostInputError(f"{path}:{n}: not a JSON line") from None
        if isinstance(record, dict) and isinstance(record.get("mfu"), (int, float)):
            values.append(float(record["mfu"]))
    if not values:
        raise CostInputError(f"{path}: no train line has `mfu` (CPU runs log none); give --mfu instead")
    return statistics.median(values)


@dataclass(frozen=True)
class Throughput:
    """Generated tokens per second of one serving replica, and where the number came from."""
    tokens_per_sec: float
    source: str


def bench_throughput(path: Path, side: str = "lmforge") -> Throughput:
    """The best output tokens/s of `side` in a bench/serve_cpu.py --json file (its rows, one per concurrency)."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise CostInputError(f"bench file {path}: cannot read it ({e.strerror or e})") from None
    except json.JSONDecodeError:
        raise CostInputError(f"bench file {path}: not JSON (expected bench/serve_cpu.py --json output)") from None
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise CostInputError(f"bench file {path}: no `rows` list (expected bench/serve_cpu.py --json output)")
    ours = [r for r in rows if isinstance(r, dict) and r.get("side") == side and not r.get("failed")
            and isinstance(r.get("tokens_per_sec"), (int, float)) and r["tokens_per_sec"] > 0]
    if not ours:
        raise CostInputError(f"bench file {path}: no row of side {side!r} without failed requests")
    best = max(ours, key=lambda r: r["tokens_per_sec"])
    return Throughput(float(best["tokens_per_sec"]),
                      f"{path}: {side} at concurrency {best.get('concurrency', '?')}")


def check_loopback(url: str) -> str:
    """`url` when it is http(s) on this machine (localhost or a loopback address); a one-line error otherwise."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise CostInputError(f"metrics URL {url!r}: expected http://127.0.0.1:PORT/metrics")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise CostInputError(f"metrics URL {url!r}: only a server on this machine (localhost, 127.0.0.1, ::1) is "
                             f"read, not {host!r}")
    return url


def _scrape(url: str) -> dict[str, float]:
    """{counter name: value summed over labels} from one GET of a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(url, timeout=5) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise CostInputError(f"metrics URL {url}: not reachable ({reason})") from None
    totals: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    except ValueError as e:
        raise CostInputError(f"metrics URL {url}: not Prometheus text ({e})") from None
    return totals


GENERATED = "lmforge:generation_tokens_total"


def metrics_throughput(url: str, window_s: float) -> Throughput:
    """Generated tokens/s of a running `lmforge serve`: its generation-token counter read twice, window_s apart."""
    url = check_loopback(url)
    first, t0 = _scrape(url), time.monotonic()
    if GENERATED not in first:
        raise CostInputError(f"metrics URL {url}: no {GENERATED} counter (is it an lmforge serve /metrics?)")
    time.sleep(window_s)
    second, t1 = _scrape(url), time.monotonic()
    tokens = second.get(GENERATED, 0.0) - first[GENERATED]
    if tokens <= 0:
        raise CostInputError(f"metrics URL {url}: no tokens generated in {window_s:g} s; measure while the server "
                             f"is under load, or give --tokens-per-sec")
    return Throughput(tokens / (t1 - t0), f"{url}: {tokens:,.0f} tokens generated in {t1 - t0:.1f} s")
