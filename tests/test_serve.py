"""lmforge serve: the HTTP API end to end over the inference engine (tests/test_infer.py tests the engine)."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import pytest
import torch

from conftest import greedy_reference, require, run_cli, start_server, stop_server

KEY = "sk-test-key"  # on the command line
ENV_KEY = "sk-from-the-environment"  # LMFORGE_API_KEY
FILE_KEYS = ["sk-file-one", "sk-file-two"]  # --api-key-file
ARGV_WARNING = "warning: an API key on the command line is visible to every user of this machine (ps)"


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"# API keys, one per line\n\n{FILE_KEYS[0]}\n  {FILE_KEYS[1]}  \n")
    proc, url = start_server(tiny, "--threads", "1", "--api-key", KEY, "--api-key-file", str(key_file),
                             "--max-batch", "16", "--max-body-bytes", "65536", "--max-model-len", "512",
                             env={"LMFORGE_API_KEY": ENV_KEY})
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out[-3000:]
    assert all(k not in out.replace(ARGV_WARNING, "") for k in [KEY, ENV_KEY, *FILE_KEYS]), out  # never printed
    assert out.count(ARGV_WARNING) == 1 and "4 API key(s)" in out, out


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ---- HTTP API ----------------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(server, tiny):
    openai = require("openai")
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY)
    [model] = [m.id for m in client.models.list().data]
    assert model == str(tiny)
    c = client.completions.create(model=model, prompt="hello", max_tokens=8, temperature=0)
    assert c.choices[0].finish_reason in ("stop", "length") and c.usage.prompt_tokens == 5
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                          temperature=0)
    assert chat.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                                            temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == chat.choices[0].message.content


def test_greedy_http_equals_generate_and_echo_logprobs_equal_transformers(server, hf):
    model, tok = hf
    ids = tok("the quick brown fox").input_ids
    r = httpx.post(server + "/v1/completions", headers=auth(), json={
        "prompt": ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "logprobs": 3, "echo": True}).json()
    choice = r["choices"][0]
    gen = greedy_reference(model, ids, 12)
    assert choice["text"] == tok.decode(ids) + tok.decode(gen, skip_special_tokens=True)
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids) + 12
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids + gen])).logits[0], dim=-1)
    want = [ref[i - 1, t].item() for i, t in enumerate(ids + gen) if i > 0]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) == 3 for top in lp["top_logprobs"][1:])
    assert lp["text_offset"][:3] == [0, 1, 2]  # a character tokenizer: one character per token


def test_sixty_four_concurrent_streams_are_complete_and_uncorrupted(server, hf):
    model, tok = hf
    prompts = [f"request {i}: " + "xyz"[i % 3] * (i % 7) for i in range(64)]

    async def one(client, p):
        text, done = "", False
        async with client.stream("POST", server + "/v1/completions", headers=auth(), json={
                "prompt": p, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    text += json.loads(line[6:])["choices"][0]["text"]
        return text, done

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(main())
    for p, (text, done) in zip(prompts, results):
        assert done and text == tok.decode(greedy_reference(model, tok(p).input_ids, 16), skip_special_tokens=True)


def test_api_keys_from_flag_environment_and_file(server):
    """Each source's key opens /v1; a wrong key, a key's prefix and a missing header do not (and /health needs none)."""
    for key in (KEY, ENV_KEY, *FILE_KEYS):
        assert httpx.get(server + "/v1/models", headers=auth(key)).status_code == 200, key
    for headers in ({}, auth("sk-wrong"), auth(FILE_KEYS[0][:-1]), {"Authorization": "Bearer"},
                    {"Authorization": FILE_KEYS[0]}):
        assert httpx.get(server + "/v1/models", headers=headers).status_code == 401, headers
    assert httpx.get(server + "/health").status_code == 200


def test_api_key_file_and_empty_key_errors_are_one_line(tmp_path, tiny, capsys, monkeypatch):
    from lmforge.cli import main

    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "comments.txt").write_text("# no key yet\n\n   \n")
    (tmp_path / "latin1.txt").write_bytes(b"sk-caf\xe9\n")
    cases = [(["--api-key-file", str(tmp_path / "missing.txt")], "missing.txt: no such file"),
             (["--api-key-file", str(tmp_path / "empty.txt")], "empty.txt: holds no key"),
             (["--api-key-file", str(tmp_path / "comments.txt")], "comments.txt: holds no key"),
             (["--api-key-file", str(tmp_path)], "cannot read it (Is a directory)"),
             (["--api-key-file", str(tmp_path / "latin1.txt")], "latin1.txt: not UTF-8 text"),
             (["--api-key", ""], "api_key: a key is empty")]
    for args, message in cases:
        assert main(["serve", str(tiny), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (args, err)
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("api_key: [123456789]\nmax_batch: 0\n")  # a numeric key is a key; an error elsewhere never shows it
    assert main(["serve", str(tiny), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "max_batch" in err and "123456789" not in err


def test_errors_are_openai_shaped_4xx(server):
    def post(path, body, headers=None, **kw):
        return httpx.post(server + path, headers=auth() if headers is None else headers, json=body, **kw)

    r = post("/v1/completions", {"prompt": "x"}, headers={})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert post("/v1/completions", {"prompt": "x"}, headers=auth("sk-wrong")).status_code == 401
    assert httpx.get(server + "/health").status_code == 200  # health and metrics need no key
    r = post("/v1/completions", {"prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post("/v1/completions", {"prompt": "x", "max_token": 5})
    assert r.status_code == 400 and "Unrecognized request argument supplied: max_token" in r.json()["error"]["message"]
    r = post("/v1/completions", {"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = post("/v1/completions", {"prompt": "x" * 500, "max_tokens": 100})
    e = r.json()["error"]
    assert r.status_code == 400 and e["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in e["message"] and "600 tokens (500 in the prompt, 100 in the" \
        in e["message"]
    r = post("/v1/completions", {"prompt": [10**9]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", headers={**auth(), "content-type": "application/json"},
                   content=b"{" + b" " * 70000 + b"}")
    assert r.status_code == 413
    r = httpx.post(server + "/v1/completions", headers={**auth(), "content-type": "application/json"}, content=b"{no")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server + "/nope").status_code == 404


def test_fuzzed_bodies_get_only_4xx_and_the_server_keeps_serving(server):
    rng = random.Random(1234)
    fields = ["prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "seed", "stop", "logprobs", "echo",
              "stream", "presence_penalty", "frequency_penalty", "messages", "model", "best_of", "bogus", "user"]
    weird = [None, True, -1, 0, 2**64, -(2**70), 1e308, float("inf"), float("nan"), "", "x" * 3000, [], [[]], {},
             [1, "a"], [[1, 2], "b"], {"role": "user"}, [{"role": "wizard", "content": "hi"}], [-5], "\x00\ud800"[:1]]
    statuses = []
    with httpx.Client(timeout=60) as client:
        for i in range(200):
            path = rng.choice(["/v1/completions", "/v1/chat/completions", "/generate", "/tokenize", "/detokenize"])
            body = {rng.choice(fields): rng.choice(weird) for _ in range(rng.randint(0, 4))}
            headers = auth() if i % 10 else {"Authorization": rng.choice(["", "Bearer", "Basic abc", "Bearer " + "k" * 999])}
            if i % 17 == 0:
                raw = rng.choice([b"", b"[]", b"null", b"\xff\xfe", b'{"prompt": "a"', b"1e999999", b'"str"'])
                r = client.post(server + path, headers={**headers, "content-type": "application/json"}, content=raw)
            else:
                try:
                    content = json.dumps(body, allow_nan=True).encode()
                except (ValueError, TypeError):
                    continue
                r = client.post(server + path, headers={**headers, "content-type": "application/json"},
                                content=content)
            statuses.append(r.status_code)
            assert r.status_code < 500, (path, body, r.text)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert any(400 <= s < 500 for s in statuses)
    ok = httpx.post(server + "/v1/completions", headers=auth(), json={"prompt": "ok", "max_tokens": 2})
    assert ok.status_code == 200


def test_metrics_move(server):
    names = ["lmforge:generation_tokens_total", "lmforge:prompt_tokens_total",
             "lmforge:time_to_first_token_seconds_count", "lmforge:inter_token_latency_seconds_count",
             "lmforge:e2e_request_latency_seconds_count", 'lmforge:request_success_total{finished_reason="length"',
             'http_requests_total{handler="/v1/completions",method="POST",status="200"}',
             'http_requests_total{handler="/v1/completions",method="POST",status="401"}']
    before = {n: metric(server, n) for n in names}
    httpx.post(server + "/v1/completions", headers=auth(), json={"prompt": "abc", "max_tokens": 5, "ignore_eos": True})
    httpx.post(server + "/v1/completions", json={"prompt": "abc"})
    moved = {n: metric(server, n) - before[n] for n in names}
    assert list(moved.values()) == [5, 3, 1, 4, 1, 1, 1, 1]


def test_disconnect_aborts_and_timeout_is_408(tiny):
    """A client that goes away frees its batch slot at once; a request past --request-timeout gets 408."""
    proc, url = start_server(tiny, "--threads", "1", "--request-timeout", "2")
    try:
        long = {"prompt": "abc", "max_tokens": 8000, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={**long, "stream": True}) as resp:
            lines = resp.iter_lines()  # kept open: leaving a for loop over it would close the connection
            while not next(lines).startswith("data: "):
                pass
            assert metric(url, "lmforge:num_requests_running") == 1
        deadline = time.monotonic() + 20
        while metric(url, 'lmforge:request_success_total{finished_reason="abort"') < 1:
            assert time.monotonic() < deadline, "the disconnected stream was not aborted"
            time.sleep(0.05)
        assert metric(url, "lmforge:num_requests_running") == 0
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/completions", json=long, timeout=60)
        assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"
        assert time.monotonic() - t0 < 10
        assert httpx.post(url + "/v1/completions", json={"prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        stop_server(proc)


def metric(url: str, prefix: str) -> float:
    """Sum of the /metrics samples whose name and labels start with `prefix`."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_model(server: str) -> str:
    return httpx.get(server + "/v1/models", headers=auth()).json()["data"][0]["id"]


def test_tokenize_detokenize_generate_and_models(server, tiny):
    r = httpx.post(server + "/tokenize", headers=auth(), json={"prompt": "hey"}).json()
    assert r["count"] == 3 and r["max_model_len"] == 512
    assert httpx.post(server + "/detokenize", headers=auth(), json={"tokens": r["tokens"]}).json() == {"prompt": "hey"}
    g = httpx.post(server + "/generate", headers=auth(), json={"prompt": "hey", "max_tokens": 4, "temperature": 0})
    assert g.status_code == 200 and set(g.json()) == {"generated_text", "tokens_generated", "time_taken"}
    assert 1 <= g.json()["tokens_generated"] <= 4


def test_serve_bad_model_and_config_errors(tmp_path):
    p = run_cli("serve", str(tmp_path / "missing"), check=False, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
    p = run_cli("serve", check=False, timeout=60)
    assert p.returncode == 2 and "needs a MODEL" in p.stderr
    cfg = tmp_path / "s.yaml"
    cfg.write_text("model: x\nmax_batch: 0\n")
    p = run_cli("serve", "--config", str(cfg), check=False, timeout=60)
    assert p.returncode == 2 and "max_batch" in p.stderr


# ---- --backend vllm ----------------------------------------------------------------------------
# A value away from the default for every ServeConfig key: a new key fails the test below until it is classified in
# server.py (VLLM_PASSED or VLLM_REFUSED) and given a value here.
NON_DEFAULT = {"host": "0.0.0.0", "port": 9001, "api_key": ["sk-1"], "api_key_file": "FILE",
               "served_model_name": ["a", "b"], "max_batch": 7, "max_model_len": 4096, "max_prefill_tokens": 2048,
               "dtype": "float16", "max_queue": 5, "request_timeout": 5.0, "max_body_bytes": 4096, "threads": 2,
               "device": "cpu"}


def test_every_serve_setting_is_passed_to_vllm_or_refused(tmp_path):
    from lmforge.errors import UserError
    from lmforge.serve.server import VLLM_PASSED, VLLM_REFUSED, ServeConfig, resolve_api_keys, vllm_command

    assert set(VLLM_PASSED) | set(VLLM_REFUSED) == set(ServeConfig.model_fields), "classify every key for vLLM"
    assert not set(VLLM_PASSED) & set(VLLM_REFUSED)
    (tmp_path / "keys").write_text("sk-file\n")

    def launch(**settings):
        cfg = ServeConfig(model="m", **settings)
        return vllm_command(cfg, "/models/m", resolve_api_keys(cfg, environ={}), auto_dtype="bfloat16")

    base_cmd, base_env = launch()
    assert base_cmd == ["vllm", "serve", "/models/m", "--host", "127.0.0.1", "--port", "8000", "--served-model-name",
                        "m", "--max-num-seqs", "32", "--max-num-batched-tokens", str(1024 + 32), "--dtype", "bfloat16"]
    assert base_env == {}
    for key in set(VLLM_PASSED) - {"model", "backend"}:  # model is vllm's MODEL argument; backend picks vLLM
        value = str(tmp_path / "keys") if NON_DEFAULT[key] == "FILE" else NON_DEFAULT[key]
        cmd, env = launch(**{key: value})
        flag = VLLM_PASSED[key].split()[0].rstrip(",;")
        assert (cmd, env) != (base_cmd, base_env), f"{key} changes nothing in what vLLM gets"
        if flag.startswith("--"):
            assert flag in cmd and cmd != base_cmd, key
        else:
            assert env == {"VLLM_API_KEY": "sk-1" if key == "api_key" else "sk-file"} and cmd == base_cmd, key
    cmd = launch(max_batch=7, max_prefill_tokens=100, max_model_len=64, dtype="float32")[0]
    assert [cmd[cmd.index(flag) + 1] for flag in ("--max-num-batched-tokens", "--max-model-len", "--dtype")] == \
        ["107", "64", "float32"]
    cmd = launch(served_model_name=["a", "b"])[0]
    assert cmd[cmd.index("--served-model-name"):][:4] == ["--served-model-name", "a", "b", "--max-num-seqs"]
    for key, reason in VLLM_REFUSED.items():
        with pytest.raises(UserError) as e:
            launch(**{key: NON_DEFAULT[key]})
        message = str(e.value)
        assert message.startswith(f"--backend vllm: {key}=") and reason in message and "\n" not in message
    with pytest.raises(UserError, match="takes one API key, got 2"):
        launch(api_key=["sk-1", "sk-2"])


FAKE_VLLM = """#!{python}
import json, os, sys
with open({record!r}, "w") as f:
    json.dump({{"argv": sys.argv[1:], "key": os.environ.get("VLLM_API_KEY")}}, f)
"""


def test_backend_vllm_execs_vllm_serve_with_the_key_in_its_environment(tiny, tmp_path):
    """The whole path to exec, with a stand-in `vllm` that records what it was given: the command line, the key in
    VLLM_API_KEY (never in argv or the output), auto dtype resolved (float32 without a GPU), refusals before exec."""
    import sys

    bin_dir, record = tmp_path / "bin", tmp_path / "vllm-got.json"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(FAKE_VLLM.format(python=sys.executable, record=str(record)))
    (bin_dir / "vllm").chmod(0o755)
    env = {"PATH": str(bin_dir), "LMFORGE_API_KEY": ENV_KEY, "CUDA_VISIBLE_DEVICES": ""}
    p = run_cli("serve", str(tiny), "--backend", "vllm", "--max-batch", "8", "--served-model-name", "tiny", env=env,
                timeout=120)
    got = json.loads(record.read_text())
    assert got == {"key": ENV_KEY, "argv": [
        "serve", str(tiny), "--host", "127.0.0.1", "--port", "8000", "--served-model-name", "tiny", "--max-num-seqs",
        "8", "--max-num-batched-tokens", "1032", "--dtype", "float32"]}
    assert ENV_KEY not in p.stdout + p.stderr and ARGV_WARNING not in p.stderr
    assert "exec: vllm serve " in p.stdout and "does not apply" not in p.stdout
    assert "max_queue, request_timeout, max_body_bytes, threads, device settings do not apply" in p.stdout
    assert "warning: vLLM checks the API key only under /v1" in p.stderr  # what vLLM's key leaves open, said once

    record.unlink()
    p = run_cli("serve", str(tiny), "--backend", "vllm", "--max-queue", "5", env=env, check=False, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: --backend vllm: max_queue=5 has no vLLM equivalent")
    assert p.stderr.count("\n") == 1 and not record.exists()
    p = run_cli("serve", str(tiny), "--backend", "vllm", env={"PATH": str(tmp_path)}, check=False, timeout=120)
    assert p.returncode == 2 and "needs the vllm package" in p.stderr and p.stderr.count("\n") == 1


def test_n_choices_echo_only_and_chat_logprobs(server, hf):
    model, tok = hf
    r = httpx.post(server + "/v1/completions", headers=auth(), json={
        "prompt": ["ab", "cd"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3] and r["usage"]["completion_tokens"] == 24
    again = httpx.post(server + "/v1/completions", headers=auth(), json={
        "prompt": ["ab", "cd"], "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 5, "ignore_eos": True}).json()
    assert [c["text"] for c in r["choices"]] == [c["text"] for c in again["choices"]]  # seeded: reproducible

    echo = httpx.post(server + "/v1/completions", headers=auth(), json={
        "prompt": "hello", "max_tokens": 0, "echo": True, "logprobs": 1}).json()["choices"][0]
    assert echo["text"] == "hello" and len(echo["logprobs"]["token_logprobs"]) == 5
    assert echo["finish_reason"] == "length"

    chat = httpx.post(server + "/v1/chat/completions", headers=auth(), json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
            {"type": "text", "text": "hi"}]}], "max_tokens": 4, "temperature": 0, "logprobs": True,
        "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and all(len(c["top_logprobs"]) == 2 for c in content)
    assert content[0]["logprob"] == pytest.approx(content[0]["top_logprobs"][0]["logprob"])  # greedy took the top


def test_serves_a_lora_adapter_merged_on_its_base(tiny, hf, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged = peft.merge_and_unload().eval()
    _, tok = hf
    ids = tok("adapter").input_ids
    proc, url = start_server(tmp_path / "adapter", "--threads", "1")
    try:
        r = httpx.post(url + "/v1/completions", json={"prompt": ids, "max_tokens": 10, "temperature": 0,
                                                      "ignore_eos": True}).json()
    finally:
        stop_server(proc)
    assert r["choices"][0]["text"] == tok.decode(greedy_reference(merged, ids, 10), skip_special_tokens=True)
    assert r["model"] == str(tmp_path / "adapter")


