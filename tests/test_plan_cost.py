"""`lmforge plan cost`: the training FLOPs and dollars, the guide's scenarios and breakeven, throughput from a bench
JSON or a server's /metrics, capacity-aware breakeven, and one-line errors for bad input."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, free_port, run_cli
from lmforge.cli import main
from lmforge.config import validate
from lmforge.plan.cost import (GUIDE_BREAKEVEN, PlanCostConfig, breakeven, parse_count, plan_cost,
                               price_only_breakeven, serve_cost, train_cost)
from lmforge.plan.cost_sources import GPUS, CostInputError, Throughput, bench_throughput, load_prices, run_mfu

# The 7b preset (Llama-2-7B's shape): 32 layers of 4·4096² attention + 3·4096·11008 MLP + 2·4096 norms, plus the
# final norm; the output head adds 32000·4096 to 6N and attention adds 12·32·4096·4096 at sequence 4096.
N_7B = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096
FLOPS_PER_TOKEN_7B = 6 * (N_7B + 32000 * 4096) + 12 * 32 * 4096 * 4096


def cfg(**keys) -> PlanCostConfig:
    return validate(PlanCostConfig, keys)


def test_peak_flops_are_those_mfu_is_logged_against():
    """The catalogue's peak FLOP/s (torch-free, for the planner) equal the table train/ measures MFU against."""
    from lmforge.train import metrics

    for name, gpu in GPUS.items():
        assert gpu.peak_flops == metrics.PEAK_BF16_FLOPS[name.split("-")[0].upper()]


def test_guide_scenarios_on_a100():
    """7B on 1T tokens and 70B on 2T tokens, on A100-80GB at 40 % MFU: FLOPs, GPU-hours, days and dollars."""
    a100 = GPUS["a100-80gb"]
    seven = train_cost("7b", parse_count("1T"), a100, 0.4, gpus=1024)
    assert seven.flops == FLOPS_PER_TOKEN_7B * 10**12 == pytest.approx(4.6087e22, rel=1e-4)
    assert seven.flops_6nd == 6 * N_7B * 10**12
    assert seven.gpu_hours == pytest.approx(seven.flops / (312e12 * 0.4) / 3600)
    assert seven.gpu_hours == pytest.approx(102_579, abs=1)
    assert seven.days == pytest.approx(102_579 / 1024 / 24, rel=1e-5)
    assert seven.usd == pytest.approx(102_579 * a100.usd_per_hour, rel=1e-5)
    seventy = train_cost("70b", parse_count("2T"), a100, 0.4, gpus=1024)
    assert seventy.flops == pytest.approx(8.890e23, rel=1e-3)
    assert seventy.attention_share == pytest.approx(12 * 80 * 8192 * 4096 / (seventy.flops / 2e12))
    # GPUs for a deadline: 90 days needs ceil(GPU-hours / 2160) GPUs, and then finishes within the 90 days
    deadline = train_cost("70b", parse_count("2T"), a100, 0.4, days=90)
    assert deadline.gpus == -(-seventy.gpu_hours // (90 * 24)) and deadline.days <= 90
    # Meta's reported 184,320 A100 hours for Llama-2-7B on 2T tokens is this formula at 44.5 % MFU
    report = plan_cost(cfg())["guide"]
    assert report.llama2_implied_mfu["7b"] == pytest.approx(0.445, abs=0.001)
    assert report.llama2_implied_mfu["70b"] == pytest.approx(0.460, abs=0.001)


def test_guide_breakeven_printed_vs_formula():
    """The guide prints 3,333,333 tokens/day; its formula on its own inputs gives 3,500,000."""
    day, api = GUIDE_BREAKEVEN["usd_per_day"], GUIDE_BREAKEVEN["api_usd_per_million"]
    assert price_only_breakeven(day, api) == pytest.approx(3_500_000)
    assert GUIDE_BREAKEVEN["printed"] == "Breakeven at 3,333,333 tokens/day"
    assert f"Breakeven at {price_only_breakeven(day, api):,.0f} tokens/day" == "Breakeven at 3,500,000 tokens/day"
    out = run_cli("plan", "cost").stdout
    assert "3,333,333" in out and "gives 3,500,000 tokens/day" in out
    assert "7b (6.48B non-embedding params) on 1T tokens" in out and "70b (68.5B" in out


def test_breakeven_counts_replicas():
    """Price-only breakeven holds only when one replica can serve it; whole replicas make a sawtooth."""
    gpu = GPUS["h100-80gb"]
    slow = serve_cost(gpu, 1, Throughput(20.0, "assumed"))  # 1,728,000 tokens/day for $71.76
    b = breakeven(slow, 2.0, daily_tokens=3_500_000)
    assert b.tokens_per_day is None  # $41.53/M at full load: never cheaper than $2/M
    assert b.price_only_tokens_per_day == pytest.approx(gpu.usd_per_hour * 24 / 2.0 * 1e6)
    assert (b.replicas, b.cheaper) == (3, "api")
    fast = serve_cost(gpu, 1, Throughput(1500.0, "assumed"))  # 129,600,000 tokens/day
    per_day = gpu.usd_per_hour * 24
    b = breakeven(fast, 0.6, daily_tokens=500_000_000)
    assert b.tokens_per_day == pytest.approx(per_day / 0.6 * 1e6)
    assert b.replicas == 4 and b.self_host_usd_per_day == pytest.approx(4 * per_day)
    assert b.api_usd_per_day == pytest.approx(300.0) and b.cheaper == "self-host"
    # just past one replica's capacity a second replica is needed and the API is cheaper again
    b = breakeven(fast, 0.6, daily_tokens=130_000_000)
    assert (b.replicas, b.cheaper) == (2, "api")
    # the guide's own example with capacity: at 20 tok/s the 3.5M tokens/day need 3 replicas
    guide = plan_cost(cfg(tokens_per_sec=20))["guide"]
    [row] = guide.capacity
    assert (row.replicas, row.cheaper, row.tokens_per_day) == (3, "api", None)
    assert row.self_host_usd_per_day == pytest.approx(21.0) and row.api_usd_per_day == pytest.approx(7.0)


def test_json_output_and_no_torch_import():
    code = ("import sys; from lmforge.cli import main; rc = main(['plan', 'cost', 'train', '--model', '70b', "
            "'--tokens', '2T', '--json']); assert rc == 0; "
            "assert not {'torch', 'transformers'} & set(sys.modules), 'heavy import on plan cost'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    train = json.loads(proc.stdout)["train"]
    assert train["model"] == "70b" and train["tokens"] == 2 * 10**12 and train["gpus"] == 1024
    assert train["usd"] == pytest.approx(train["gpu_hours"] * GPUS["a100-80gb"].usd_per_hour)


def test_example_configs_and_price_override(tmp_path, capsys):
    assert main(["plan", "cost", "configs/plan/cost.yaml", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["serve"]["gpu"] == "h100-80gb" and report["serve"]["usd_per_day"] == pytest.approx(2.49 * 24)
    assert report["breakeven"]["replicas"] == 4
    assert main(["plan", "cost", "configs/plan/cost.yaml", "train", "gpu=b200-180gb", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["train"]
    assert train["gpu_hours"] == pytest.approx(FLOPS_PER_TOKEN_7B * 1e12 / (2250e12 * 0.4) / 3600)
    prices = load_prices(ROOT / "configs/plan/cost_prices.yaml")
    assert prices["a100-80gb"].usd_per_hour == 1.50 and prices["a100-80gb"].peak_flops == 312e12
    assert prices["l4-24gb"] == GPUS["l4-24gb"]


def test_measured_mfu_and_bench_throughput(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"step": 1, "loss": 9.0}, {"step": 2, "mfu": 0.30}, {"step": 3, "event": "x", "detail": ""},
             {"step": 4, "mfu": 0.42}, {"step": 5, "mfu": 0.44}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert run_mfu(run) == 0.42
    c = train_cost("7b", 10**12, GPUS["a100-80gb"], run_mfu(run), gpus=64)
    assert plan_cost(cfg(what="train", run=str(run), gpus=64))["train"].gpu_hours == pytest.approx(c.gpu_hours)
    bench = tmp_path / "serve.json"
    bench.write_text(json.dumps({"rows": [
        {"side": "lmforge", "concurrency": 1, "tokens_per_sec": 31.0, "failed": 0},
        {"side": "lmforge", "concurrency": 8, "tokens_per_sec": 160.6, "failed": 0},
        {"side": "lmforge", "concurrency": 32, "tokens_per_sec": 300.0, "failed": 3},
        {"side": "transformers", "concurrency": 32, "tokens_per_sec": 93.4, "failed": 0}]}))
    t = bench_throughput(bench)
    assert t.tokens_per_sec == 160.6 and "concurrency 8" in t.source
    serve = plan_cost(cfg(what="serve", bench=str(bench), gpu="l4-24gb"))["serve"]
    assert serve.usd_per_million == pytest.approx(0.80 * 24 / (160.6 * 86400) * 1e6)


class _FakeServer(BaseHTTPRequestHandler):
    """A /metrics whose generation-token counter grows at 1,000 tokens/s, in lmforge serve's own registry."""
    started = time.monotonic()

    def do_GET(self):
        from prometheus_client import generate_latest

        from lmforge.serve.metrics import Metrics

        m = Metrics("fake")
        m.generation_tokens.inc(1000 * (time.monotonic() - self.started))
        body = generate_latest(m.registry)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_metrics_url_throughput():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
        serve = plan_cost(cfg(what="serve", metrics_url=url, scrape_s=0.5))["serve"]
        assert serve.tokens_per_sec == pytest.approx(1000, rel=0.1)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("args, message", [
    (["train", "--gpu", "b200"], "unknown gpu 'b200'; choose one of a100-40gb"),
    (["train", "--tokens", "-5"], "tokens: expected a positive token count"),
    (["train", "tokens=0"], "tokens: a token count must be positive"),
    (["train", "--model", "3b"], "unknown model '3b'; choose a preset"),
    (["train", "--prices", "missing.yaml"], "prices file missing.yaml: cannot read it"),
    (["serve"], "plan cost serve needs a throughput"),
    (["serve", "--tokens-per-sec", "5", "--bench", "x.json"], "give one of --tokens-per-sec, --bench, --metrics-url"),
    (["serve", "--metrics-url", "http://10.1.2.3:8000/metrics"], "only a server on this machine"),
    (["serve", "--metrics-url", "http://example.com/metrics"], "only a server on this machine"),
    (["serve", "--metrics-url", "file:///etc/passwd"], "expected http://127.0.0.1:PORT/metrics"),
    (["serve", "--metrics-url", "http://127.0.0.1:{port}/metrics"], "not reachable"),
    (["train", "--run", "."], "run .: no metrics.jsonl there"),
    (["cost"], "what: Input should be 'guide', 'train', 'serve' or 'breakeven'"),
])
def test_bad_input_is_one_line(args, message, capsys):
    args = [a.replace("{port}", str(free_port())) for a in args]
    assert main(["plan", "cost", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


@pytest.mark.parametrize("text, message", [
    ("gpus: [", "not valid YAML"),
    ("a100-80gb: 1.5", "expected one key `gpus:`"),
    ("gpus: {b200: {usd_per_hour: 5}}", "gpus.b200 is not in the catalogue, so it needs both"),
    ("gpus: {a100-80gb: {usd_per_hour: -1}}", "gpus.a100-80gb.usd_per_hour must be a positive number"),
    ("gpus: {a100-80gb: {price: 1}}", "gpus.a100-80gb: give usd_per_hour and/or peak_tflops"),
])
def test_bad_prices_yaml(tmp_path, text, message):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(CostInputError, match=message.replace("[", r"\[")):
        load_prices(path)


def test_parse_count():
    assert [parse_count(x) for x in ("1T", "300B", "2e12", "1.5M", "10k", 1000, "7")] == [
        10**12, 3 * 10**11, 2 * 10**12, 1_500_000, 10_000, 1000, 7]
    for bad in ("-1T", "1X", "", True, float("inf"), 0):
        with pytest.raises(ValueError):
            parse_count(bad)
