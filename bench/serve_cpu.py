"""Serving on CPU: `lmforge serve` vs `transformers serve --continuous-batching` vs sequential `generate`, same run.

All three serve SmolLM2-135M-Instruct (fp32) from the same HF directory, converted from the GGUF
once by `lmforge.model.load.hf_dir` in this (parent) process before any side runs. The workload is
the first N (--requests, 64) records of the Alpaca file; each user message is the record's
`instruction`, plus "\\n\\n" + `input` when that is non-empty, in the model's chat template; greedy,
at most --max-tokens (128) new tokens, stopping at EOS.

- lmforge: `python -m lmforge serve HF_DIR --port P --max-batch 32 --device cpu`, as a user would start it;
- transformers: `transformers serve HF_DIR --continuous-batching --device cpu --port P` (HF_HUB_OFFLINE=1);
- generate: `AutoModelForCausalLM.from_pretrained(HF_DIR)` fp32, `torch.set_num_threads(cpu_count)`,
  `model.generate(max_new_tokens=..., do_sample=False)` one prompt after another, in a subprocess.

Each server is started in its own process group, polled on GET /health until 200, warmed up with 2
short requests, then measured at each concurrency level (--concurrency, 1,8,32) with all N requests:
an asyncio client (httpx) keeps at most that many requests in flight, each a streaming
`POST /v1/chat/completions` (OpenAI wire format: `temperature` 0, `max_tokens`, `stream: true`).
Measured per (side, concurrency):

- output tok/s: output tokens of all requests over the level's wall time (first request sent to the
  last stream closed). Output tokens are counted the same way for both servers, by tokenizing each
  request's full streamed text with the model's tokenizer (no special tokens), so neither server's
  usage accounting matters; for generate they are the generated ids, EOS excluded;
- mean out tokens per request (greedy on the same prompts: the sides should be close; a side that
  stops early or ignores max_tokens shows here);
- TTFT p50 / p99: time from sending a request to its first chunk with non-empty content (n/a for
  generate);
- failed requests (non-200, an error in the stream, a stream cut before `data: [DONE]` or a chunk with
  a finish_reason, or an exception): reported as `requests ok` N-failed/N with a warning line; failed
  requests count no tokens, and the exit status is then 1.

The JSON (--json) also holds each server's warm-up time and idle CPU after it, the CPU other work
used while each level ran (in cores: ~0 on a quiet machine; above 0.1 a warning is printed), the
finish_reasons, and how many greedy outputs match generate's text (printed when generate runs).

Targets (issue): at concurrency 8, lmforge >= 2x transformers serve's output tok/s and a lower
p50 TTFT. The machine is noisy (2 shared cores): the sides go one after another, never two at once,
and before each side the bench waits up to --wait-idle seconds for the machine to go idle.

    python bench/serve_cpu.py [--requests 64] [--max-tokens 128] [--concurrency 1,8,32]
        [--sides lmforge,transformers,generate] [--data ../shared/data/alpaca_5000.json]
        [--model smollm2-135m-instruct] [--max-batch 32] [--wait-idle 300] [--keep DIR] [--json results.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune_cpu import cpu_busy_s, wait_idle  # bench/ is on sys.path when this runs as a script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "alpaca_5000.json"
SIDES = ("lmforge", "transformers", "generate")
TARGET_CONCURRENCY, TARGET_SPEED = 8, 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_prompts(path: Path, n: int) -> list[str]:
    records = json.loads(path.read_text())[:n]
    return [r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "") for r in records]


def percentile(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


# ---------------------------------------------------------------- generate baseline (runs as its own process)
def generate_worker(hf: str, data: str, n: int, max_tokens: int, out: str) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count())
    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    prompts = load_prompts(Path(data), n)
    results = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            t = time.perf_counter()
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            gen = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False)
            new = [i for i in gen[0, ids["input_ids"].shape[1]:].tolist() if i not in eos]
            results.append({"tokens": len(new), "text": tok.decode(new, skip_special_tokens=True),
                            "s": time.perf_counter() - t})
    wall = time.perf_counter() - t0
    Path(out).write_text(json.dumps({"wall_s": wall, "requests": results, "threads": torch.get_num_threads()}))
    return 0


def run_generate(a, hf: Path, work: Path) -> dict:
    out, logf = work / "generate.json", work / "generate.log"
    busy_before = wait_idle(a.wait_idle)
    log(f"generate: sequential model.generate on {a.requests} prompts")
    cmd = [sys.executable, __file__, "--generate-worker", str(hf), str(a.data), str(a.requests),
           str(a.max_tokens), str(out)]
    busy0, cpu0, t0 = cpu_busy_s(), _children_cpu_s(), time.perf_counter()
    with open(logf, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    proc_wall, busy, own_cpu = time.perf_counter() - t0, cpu_busy_s() - busy0, _children_cpu_s() - cpu0
    if rc != 0:
        raise RuntimeError(f"generate failed (exit {rc}); last lines of {logf}:\n{_tail(logf)}")
    r = json.loads(out.read_text())
    reqs = r["requests"]
    tokens = sum(q["tokens"] for q in reqs)
    return {
        "side": "generate", "concurrency": "seq", "requests": len(reqs), "ok": len(reqs), "failed": 0,
        "errors": [], "wall_s": r["wall_s"], "output_tokens": tokens, "tokens_per_sec": tokens / r["wall_s"],
        "mean_out_tokens": tokens / len(reqs), "ttft_p50_s": None, "ttft_p99_s": None,
        "request_s_p50": statistics.median(q["s"] for q in reqs), "threads": r["threads"],
        "busy_cores_before": busy_before,
        "others_cores": max(0.0, busy - own_cpu) / proc_wall,  # over the whole process, load included
        "texts": [q["text"] for q in reqs],
    }


def _children_cpu_s() -> float:
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _tail(path: Path, n: int = 30) -> str:
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])


# ---------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(side: str, hf: Path, port: int, a) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if side == "lmforge":
        return [sys.executable, "-m", "lmforge", "serve", str(hf), "--port", str(port),
                "--max-batch", str(a.max_batch), "--device", "cpu"], env
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    exe = Path(sys.executable).with_name("transformers")
    return [str(exe), "serve", str(hf), "--continuous-batching", "--device", "cpu",
            "--host", "127.0.0.1", "--port", str(port)], env


def start_server(side: str, hf: Path, a, work: Path) -> tuple[subprocess.Popen, str, Path]:
    import httpx

    port = free_port()
    cmd, env = server_cmd(side, hf, port, a)
    logf = work / f"{side}-server.log"
    log(f"{side}: {' '.join(cmd)}")
    with open(logf, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{side} server exited ({proc.returncode}) before /health; {logf}:\n{_tail(logf)}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > a.health_timeout:
            stop_server(proc)
            raise RuntimeError(f"{side} server not healthy after {a.health_timeout:.0f} s; {logf}:\n{_tail(logf)}")
        time.sleep(0.5)
    log(f"{side}: healthy after {time.monotonic() - t0:.1f} s")
    return proc, url, logf


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def server_cpu_s(pid: int) -> float:
    """CPU seconds used so far by the server process and its children."""
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for q in procs:
        try:
            t = q.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    """One streaming chat completion; returns its text, TTFT and whether it succeeded."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    t0 = time.perf_counter()
    ttft, parts, done, finish, error = None, [], False, None, None
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        error = f"error in stream: {json.dumps(chunk['error'])[:300]}"
                        break
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            if ttft is None:
                                ttft = time.perf_counter() - t0
                            parts.append(text)
                        finish = choice.get("finish_reason") or finish
                # transformers serve 5.24 never sends [DONE]: its last chunk carries the finish_reason.
                if error is None and not done and finish is None:
                    error = "stream ended without data: [DONE] or a finish_reason"
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        error = f"{type(e).__name__}: {e}"
    return {"ok": error is None, "error": error, "text": "".join(parts), "ttft_s": ttft,
            "finish_reason": finish, "s": time.perf_counter() - t0}


async def run_level(url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int) -> tuple[list, float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        async def bounded(p: str) -> dict:
            async with sem:
                return await one_request(client, url, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        return results, time.perf_counter() - t0


def run_server_side(side: str, a, hf: Path, prompts: list[str], tok, work: Path) -> list[dict]:
    busy_before = wait_idle(a.wait_idle)
    proc, url, logf = start_server(side, hf, a, work)
    rows = []
    try:
        warm, warm_s = asyncio.run(run_level(url, str(hf), prompts[:2], 8, 1))
        bad = [r["error"] for r in warm if not r["ok"]]
        if bad:
            raise RuntimeError(f"{side} warm-up failed: {bad[0]}; {logf}:\n{_tail(logf)}")
        # What the idle server itself burns (a busy-polling scheduler shows here), over 2 s.
        b0, s0 = cpu_busy_s(), server_cpu_s(proc.pid)
        time.sleep(2.0)
        idle = {"warmup_s": warm_s, "idle_server_cores": (server_cpu_s(proc.pid) - s0) / 2.0,
                "idle_machine_cores": (cpu_busy_s() - b0) / 2.0}
        for c in a.concurrency:
            log(f"{side}: concurrency {c}, {len(prompts)} requests")
            b0, s0, c0 = cpu_busy_s(), server_cpu_s(proc.pid), time.process_time()
            results, wall = asyncio.run(run_level(url, str(hf), prompts, a.max_tokens, c))
            others = (cpu_busy_s() - b0) - (server_cpu_s(proc.pid) - s0) - (time.process_time() - c0)
            rows.append(summarize(side, c, results, wall, tok) | idle | {
                "busy_cores_before": busy_before, "others_cores": max(0.0, others) / wall})
            r = rows[-1]
            log(f"{side} c={c}: {r['ok']}/{r['requests']} ok, {r['tokens_per_sec']:.1f} tok/s, "
                f"TTFT p50 {_fmt(r['ttft_p50_s'], '.3f')} s, wall {wall:.1f} s")
    finally:
        stop_server(proc)
    return rows


def summarize(side: str, c: int, results: list[dict], wall: float, tok) -> dict:
    ok = [r for r in results if r["ok"]]
    counts = [len(tok(r["text"], add_special_tokens=False)["input_ids"]) for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    finishes: dict[str, int] = {}
    for r in ok:
        finishes[str(r["finish_reason"])] = finishes.get(str(r["finish_reason"]), 0) + 1
    return {
        "side": side, "concurrency": c, "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "wall_s": wall, "output_tokens": sum(counts), "tokens_per_sec": sum(counts) / wall,
        "mean_out_tokens": statistics.fmean(counts) if counts else 0.0,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "no_content": len(ok) - len(ttfts), "finish_reasons": finishes,
        "texts": [r["text"] if r["ok"] else None for r in results],
    }


def _fmt(v, f: str) -> str:
    return "n/a" if v is None else format(v, f)


# ---------------------------------------------------------------- main
def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--generate-worker":
        hf, data, n, max_tokens, out = sys.argv[2:]
        return generate_worker(hf, data, int(n), int(max_tokens), out)

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Alpaca JSON array (instruction/input/output)")
    p.add_argument("--model", default="smollm2-135m-instruct", help="lmforge model spec, converted by hf_dir")
    p.add_argument("--requests", type=int, default=64, help="the first N records are the prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--concurrency", default="1,8,32", help="comma list of client concurrency levels")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of: {', '.join(SIDES)}")
    p.add_argument("--max-batch", type=int, default=32, help="lmforge serve --max-batch")
    p.add_argument("--health-timeout", type=float, default=180.0, help="seconds to wait for GET /health == 200")
    p.add_argument("--wait-idle", type=float, default=300,
                   help="before each side, wait up to this many seconds for other work on the machine to finish")
    p.add_argument("--keep", type=Path, help="keep the work files (server logs, generate output) in this directory")
    p.add_argument("--json", type=Path, help="write all results here")
    a = p.parse_args()
    a.concurrency = [int(x) for x in a.concurrency.split(",") if x.strip()]
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad:
        print(f"error: unknown --sides {bad}; choose from {list(SIDES)}", file=sys.stderr)
        return 2
    if not a.data.is_file():
        print(f"error: {a.data} not found (pass --data alpaca.json)", file=sys.stderr)
        return 2
    prompts = load_prompts(a.data, a.requests)

    # One conversion, in the parent, before any side is measured; every side loads this directory.
    from lmforge.model.load import hf_dir
    from transformers import AutoTokenizer

    hf = Path(hf_dir(a.model))
    tok = AutoTokenizer.from_pretrained(hf)
    log(f"model: {a.model} -> {hf}; {len(prompts)} prompts, max_tokens {a.max_tokens}, concurrency {a.concurrency}")

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lmforge-servebench-") as tmp:
        work = a.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for side in sides:
            if side == "generate":
                rows.append(run_generate(a, hf, work))
            else:
                rows.extend(run_server_side(side, a, hf, prompts, tok, work))

    print(f"machine: {os.cpu_count()} cores; model dir: {hf}; {len(prompts)} requests, max_tokens {a.max_tokens}, "
          f"greedy, streaming")
    print("| side | concurrency | requests ok | output tok/s | mean out tokens | TTFT p50 (s) | TTFT p99 (s) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['concurrency']} | {r['ok']}/{r['requests']} | {r['tokens_per_sec']:.1f} | "
              f"{r['mean_out_tokens']:.1f} | {_fmt(r['ttft_p50_s'], '.3f')} | {_fmt(r['ttft_p99_s'], '.3f')} | "
              f"{r['wall_s']:.1f} |")

    by = {(r["side"], r["concurrency"]): r for r in rows}
    ratios = {}
    for c in a.concurrency:
        lm, tr = by.get(("lmforge", c)), by.get(("transformers", c))
        if not (lm and tr) or not tr["tokens_per_sec"]:
            continue
        speed = lm["tokens_per_sec"] / tr["tokens_per_sec"]
        ttft = (lm["ttft_p50_s"] / tr["ttft_p50_s"]) if lm["ttft_p50_s"] and tr["ttft_p50_s"] else None
        ratios[c] = {"tokens_per_sec": speed, "ttft_p50": ttft}
        line = f"concurrency {c}: lmforge / transformers output tok/s {speed:.2f}x, TTFT p50 {_fmt(ttft, '.2f')}x"
        if c == TARGET_CONCURRENCY:
            line += (f" (targets: tok/s >= {TARGET_SPEED}x {'OK' if speed >= TARGET_SPEED else 'MISS'}, "
                     f"TTFT p50 < 1x {'OK' if ttft is not None and ttft < 1 else 'MISS'})")
        print(line)

    failed = [r for r in rows if r["failed"]]
    for r in failed:
        print(f"warning: {r['side']} c={r['concurrency']}: {r['failed']} failed requests, e.g. {r['errors'][0]}")
    gen = next((r for r in rows if r["side"] == "generate"), None)
    if gen:
        for r in rows:
            if r is not gen:
                same = sum(t is not None and t.strip() == g.strip() for t, g in zip(r["texts"], gen["texts"]))
                r["same_text_as_generate"] = same
        print("outputs identical to generate's: " + ", ".join(
            f"{r['side']} c={r['concurrency']} {r['same_text_as_generate']}/{r['requests']}"
            for r in rows if r is not gen))
    noisy = [f"{r['side']} c={r['concurrency']}" for r in rows if r["others_cores"] > 0.1]
    if noisy:
        print(f"warning: other work used > 0.1 cores while {', '.join(noisy)} ran: those timings are suspect")

    if a.json:
        a.json.write_text(json.dumps({
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
            "hf_dir": str(hf), "cpu_count": os.cpu_count(), "rows": rows, "ratios": ratios,
        }, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
