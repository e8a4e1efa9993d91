"""deploy/nginx.conf in front of two `lmforge serve` replicas: a real nginx (Debian's package, which .ci/run
installs) balances requests over both, and when one replica is killed, requests keep succeeding on the other.

The test runs the committed config with only the ports changed (replicas on free ports, nginx on a free
loopback port); its pid, logs and temp dirs are prefix-relative, so `-p TMP/` keeps everything in tmp_path.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, free_port, require, save_tiny, start_server, stop_server, wait_healthy

NGINX_CONF = ROOT / "deploy" / "nginx.conf"
KEY = "sk-deploy-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": "hello", "max_tokens": 4, "temperature": 0}


def find_nginx() -> str:
    """nginx's path; skip without it, except under CI (which installs it), where that is a failure."""
    return require("nginx", binary=True, why=".ci/run installs it (apt-get install nginx)")


def _replace_directive(text: str, old: str, new: str) -> str:
    """TEXT with the one directive line (not a comment) that starts with OLD starting with NEW instead."""
    text, n = re.subn(rf"^(\s*){re.escape(old)}", lambda m: m.group(1) + new, text, flags=re.M)
    assert n == 1, f"deploy/nginx.conf should have exactly one line starting with {old!r}, not {n}"
    return text


def render_conf(replica_ports: list[int], listen_port: int) -> str:
    """deploy/nginx.conf with the replicas' ports for 8001 and 8002, listening on 127.0.0.1:LISTEN_PORT."""
    text = NGINX_CONF.read_text()
    for default, port in zip((8001, 8002), replica_ports):
        text = _replace_directive(text, f"server 127.0.0.1:{default} ", f"server 127.0.0.1:{port} ")
    return _replace_directive(text, "listen 8080;", f"listen 127.0.0.1:{listen_port};")


def start_nginx(exe: str, prefix: Path, conf: Path, url: str, timeout: float = 30) -> subprocess.Popen:
    """`nginx -p PREFIX/ -c CONF` in the foreground, in its own process group, once URL/health answers 200."""
    directives = "daemon off;"
    if os.geteuid() == 0:  # as root, workers would run as `nobody`, which cannot enter pytest's 0700 tmp dirs
        directives += " user root;"
    proc = subprocess.Popen([exe, "-p", f"{prefix}/", "-c", str(conf), "-g", directives], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_healthy(proc, url, timeout, "nginx", lambda: error_log(prefix))
    except AssertionError:
        stop_nginx(proc)
        raise
    return proc


def stop_nginx(proc: subprocess.Popen) -> None:
    """Fast shutdown (SIGTERM) of the master and its workers; SIGKILL the group if that hangs."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=10)


def error_log(prefix: Path) -> str:
    path = prefix / "error.log"
    return path.read_text()[-3000:] if path.is_file() else ""


def completions_served(client: httpx.Client, replica_url: str) -> int:
    """The replica's own count of 200 answers to POST /v1/completions, from its Prometheus /metrics."""
    text = client.get(replica_url + "/metrics").text
    for line in text.splitlines():
        m = re.fullmatch(r'http_requests_total\{(.*)\} (\S+)', line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if labels == {"handler": "/v1/completions", "method": "POST", "status": "200"}:
                return int(float(m.group(2)))
    return 0


def served_counts(client: httpx.Client, replica_urls: list[str], total: int, timeout: float = 5) -> list[int]:
    """Each replica's count once they add up to TOTAL (a replica counts a response just after sending it)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = [completions_served(client, url) for url in replica_urls]
        if sum(counts) == total or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def complete(client: httpx.Client, url: str, **overrides) -> dict:
    """POST /v1/completions (BODY with OVERRIDES) with the API key; checks for 200 and the OpenAI shape."""
    r = client.post(url + "/v1/completions", json={**BODY, **overrides}, headers=AUTH)
    assert r.status_code == 200, f"{r.status_code}: {r.text}"
    out = r.json()
    assert out["object"] == "text_completion" and len(out["choices"]) == 1, out
    assert isinstance(out["choices"][0]["text"], str) and out["usage"]["completion_tokens"] >= 1, out
    return out


@pytest.mark.slow  # two `lmforge serve` processes start (torch import): 10-20 s
def test_nginx_balances_and_fails_over(tmp_path):
    exe = find_nginx()
    model = save_tiny(tmp_path / "tiny")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    replicas, nginx, logs = [], None, []
    try:
        with ThreadPoolExecutor(2) as pool:  # both load at once; keep whichever started, to stop it below
            starts = [pool.submit(start_server, model, env={"OMP_NUM_THREADS": "1", "LMFORGE_API_KEY": KEY})
                      for _ in range(2)]
        replicas += [f.result() for f in starts if f.exception() is None]
        for f in starts:
            if f.exception() is not None:
                raise f.exception()
        ports = [int(url.rsplit(":", 1)[1]) for _, url in replicas]
        listen = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(render_conf(ports, listen))
        front = f"http://127.0.0.1:{listen}"
        nginx = start_nginx(exe, prefix, conf, front)

        with httpx.Client(trust_env=False, timeout=30) as client:
            for _, url in replicas:  # each port is the replica we started (not another test's server)
                models = client.get(url + "/v1/models", headers=AUTH).json()["data"]
                assert [m["id"] for m in models] == [str(model)], models

            # The API key passes through nginx to the replicas, which enforce it.
            r = client.post(front + "/v1/completions", json=BODY)
            assert r.status_code == 401, r.text
            assert r.json()["error"]["code"] == "invalid_api_key"

            # Balanced: 12 requests, 4 at a time; least_conn spreads them, each replica's /metrics counts its own.
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda _: complete(client, front), range(12)))
            served = served_counts(client, [url for _, url in replicas], 12)
            assert sum(served) == 12 and min(served) >= 1, f"requests per replica: {served}"

            # Kill the first replica (SIGKILL, no goodbye): every new request still succeeds, on the other.
            logs.append(stop_server(replicas.pop(0)[0]))
            for _ in range(10):
                complete(client, front)
            assert served_counts(client, [replicas[0][1]], served[1] + 10) == [served[1] + 10]

            # Streaming still flows through nginx: several SSE `data:` events, then `data: [DONE]`.
            with client.stream("POST", front + "/v1/completions", headers=AUTH,
                               json={**BODY, "max_tokens": 8, "stream": True}) as r:
                assert r.status_code == 200, r.read().decode()
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and len(events) >= 3, events
            chunks = [json.loads(e) for e in events[:-1]]
            assert all(c["object"] == "text_completion" for c in chunks), chunks
            streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
            assert streamed == complete(client, front, max_tokens=8)["choices"][0]["text"]
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        logs += [stop_server(proc) for proc, _ in replicas]
        # Shown by pytest only when the test fails.
        for log in logs:
            print(f"--- replica log:\n{log[-3000:]}")
        print(f"--- nginx error.log:\n{error_log(prefix)}")
