"""lmforge serve: the runner against transformers, the engine's batching, and the HTTP API end to end."""
from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import httpx
import pytest
import torch

from conftest import run_cli, save_tiny, start_server, stop_server
from lmforge.serve.engine import Engine, QueueFull, Request, SamplingParams
from lmforge.serve.runner import Runner

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("serve-tiny"), seed=3, max_positions=8192)


@pytest.fixture(scope="module")
def hf(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)


@pytest.fixture(scope="module")
def server(tiny):
    proc, url = start_server(tiny, "--threads", "1", "--api-key", KEY, "--max-batch", "16", "--max-body-bytes", "65536",
                              "--max-model-len", "512")
    yield url
    out = stop_server(proc)
    assert "Traceback" not in out, out[-3000:]
    assert KEY not in out


def auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def greedy_reference(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers' own forward with its KV cache, EOS treated as an ordinary token."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(x, cache=past, use_cache=True)
            past, t = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(t)
            x = torch.tensor([[t]])
    return out


def run_engine(engine: Engine, reqs: list[tuple[list[int], SamplingParams]], stagger: float = 0.0):
    """Submit requests (optionally staggered, so they join a running batch) and collect each one's events."""
    events = [[] for _ in reqs]
    done = threading.Semaphore(0)

    def sink(k):
        def f(ev):
            events[k].append(ev)
            if ev.finish_reason is not None and sum(e.finish_reason is not None for e in events[k]) == reqs[k][1].n:
                done.release()
        return f

    engine.start()
    try:
        for k, (ids, p) in enumerate(reqs):
            engine.submit(Request(list(ids), p, sink(k)))
            time.sleep(stagger)
        for _ in reqs:
            assert done.acquire(timeout=120)
    finally:
        engine.stop()
    return events


# ---- runner and engine -------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_runner_logits_equal_transformers(arch):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    kw = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    cfg = LlamaConfig(**kw) if arch == "llama" else Qwen2Config(**kw, use_sliding_window=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if arch == "qwen2":  # non-zero q/k/v biases, so the fused bias is exercised
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    runner = Runner(model, max_slots=3, max_len=256)
    a, b = list(range(5, 40)), list(range(50, 61))

    def last_logits(ids):
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1]

    with torch.no_grad():
        full_a = model(torch.tensor([a])).logits[0]
    _, [pa] = runner.forward([], [(0, a, True)])  # a prompt alone, every position's logits (echo)
    torch.testing.assert_close(pa, full_a, atol=1e-4, rtol=1e-4)
    d, [pb] = runner.forward([(7, len(a))], [(1, b, False)])  # slot 0 decodes while b is prefilled into slot 1
    torch.testing.assert_close(d[0], last_logits(a + [7]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pb[0], last_logits(b), atol=1e-4, rtol=1e-4)
    d, _ = runner.forward([(8, len(a) + 1), (9, len(b))], [])  # two rows of different lengths in one step
    torch.testing.assert_close(d[0], last_logits(a + [7, 8]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(d[1], last_logits(b + [9]), atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmforge.serve.runner import check_supported

    with pytest.raises(ValueError, match="serving supports llama, mistral, qwen2 models; this one is 'gpt2'"):
        check_supported(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).config)


def test_continuous_batching_equals_generate_greedy(hf):
    """Requests of different lengths join a running batch at different steps and leave it at different steps
    (so KV slots are reused and moved); every one still equals model.generate greedy, token for token."""
    model, tok = hf
    rng = random.Random(0)
    prompts = [tok("".join(rng.choice("abcdefgh ") for _ in range(rng.randint(3, 40)))).input_ids for _ in range(12)]
    lengths = [rng.randint(5, 30) for _ in prompts]
    engine = Engine(model, tok, [], max_batch=5, max_prefill_tokens=64)
    reqs = [(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p, n in zip(prompts, lengths)]
    events = run_engine(engine, reqs, stagger=0.01)
    for (p, n), evs in zip(zip(prompts, lengths), events):
        tokens = [t for e in evs for t in e.token_ids]
        assert tokens == greedy_reference(model, p, n)
        assert evs[-1].finish_reason == "length"
    assert engine.running == [] and len(engine.waiting) == 0


def test_sampling_seeds_top_k_and_stop(hf):
    model, tok = hf
    ids = tok("hello world").input_ids
    seeded = SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    runs = run_engine(Engine(model, tok, []), [(ids, seeded), (ids, seeded),
                                               (ids, SamplingParams(max_tokens=20, temperature=1.0, seed=8,
                                                                    ignore_eos=True)),
                                               (ids, SamplingParams(max_tokens=20, temperature=1.5, top_k=1,
                                                                    ignore_eos=True)),
                                               (ids, SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6,
                                                                    ignore_eos=True))])
    toks = [[t for e in evs for t in e.token_ids] for evs in runs]
    assert toks[0] == toks[1] and toks[0] != toks[2]
    greedy = greedy_reference(model, ids, 20)
    assert toks[3] == greedy and toks[4] == greedy  # top_k=1 and a tiny top_p leave only the argmax

    text = tok.decode(greedy)
    stop = text[6:9]
    evs = run_engine(Engine(model, tok, []), [(ids, SamplingParams(max_tokens=20, temperature=0, stop=[stop],
                                                                   ignore_eos=True))])[0]
    out = "".join(e.text for e in evs)
    assert out == text[: text.index(stop)] and evs[-1].finish_reason == "stop"


def test_queue_full_and_cancel_free_the_slot(hf):
    model, tok = hf
    engine = Engine(model, tok, [], max_batch=1, max_queue=1)
    p = SamplingParams(max_tokens=100000, temperature=0, ignore_eos=True)
    first, second = Request(tok("a").input_ids, p, lambda ev: None), Request(tok("b").input_ids, p, lambda ev: None)
    engine.start()
    try:
        engine.submit(first)
        deadline = time.monotonic() + 30
        while not engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        engine.submit(second)  # the batch is full: it waits
        with pytest.raises(QueueFull):
            engine.submit(Request(tok("c").input_ids, p, lambda ev: None))
        first.cancelled = True
        while not (engine.running and engine.running[0].req is second) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [s.req for s in engine.running] == [second] and not engine.waiting  # it took the freed slot
    finally:
        second.cancelled = True
        engine.stop()


# ---- HTTP API ----------------------------------------------------------------------------------
def test_openai_client_completions_chat_and_streaming(server, tiny):
    openai = pytest.importorskip("openai")
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


def test_vllm_backend_command_and_missing_package(tiny):
    from lmforge.serve.server import ServeConfig, vllm_command

    cfg = ServeConfig(model=str(tiny), port=9000, max_batch=64, max_model_len=4096, api_key=["k1"])
    cmd, env = vllm_command(cfg, str(tiny))
    assert cmd[:3] == ["vllm", "serve", str(tiny)] and cmd[cmd.index("--max-num-seqs") + 1] == "64"
    assert cmd[cmd.index("--max-model-len") + 1] == "4096" and cmd[cmd.index("--served-model-name") + 1] == str(tiny)
    assert env == {"VLLM_API_KEY": "k1"} and "k1" not in cmd
    import shutil
    if shutil.which("vllm") is None:
        p = run_cli("serve", str(tiny), "--backend", "vllm", check=False, timeout=60)
        assert p.returncode == 2 and "needs the vllm package" in p.stderr


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


@pytest.mark.slow
def test_smollm2_greedy_batch_equals_model_generate(smollm2_cache, monkeypatch):
    """The real model: six chat prompts decoded together (joining at different steps) give exactly
    model.generate's greedy tokens, EOS included."""
    from lmforge.generate import eos_ids
    from lmforge.model.load import load_model, load_tokenizer

    monkeypatch.setenv("LMFORGE_CACHE", str(smollm2_cache))
    model, tok = load_model("smollm2-135m-instruct").eval(), load_tokenizer("smollm2-135m-instruct")
    questions = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
                 "What is 12 times 7?", "Who wrote Hamlet?", "Give one tip for sleeping well."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in questions]
    stops = eos_ids(model, tok)
    events = run_engine(Engine(model, tok, stops, max_batch=4), [
        (p, SamplingParams(max_tokens=40, temperature=0)) for p in prompts], stagger=0.05)
    for p, evs in zip(prompts, events):
        with torch.no_grad():
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                 max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert [t for e in evs for t in e.token_ids] == ref
        assert "".join(e.text for e in evs) == tok.decode(ref, skip_special_tokens=True)
    assert "Paris" in "".join(e.text for e in events[0])


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


def test_an_engine_failure_aborts_the_requests_in_flight_and_keeps_serving(hf):
    model, tok = hf
    engine = Engine(model, tok, [])
    real, calls = engine.runner.forward, []

    def fail_once(*a):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(*a)

    engine.runner.forward = fail_once
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    [first, second] = run_engine(engine, [(tok("a").input_ids, p)]) + run_engine(engine, [(tok("b").input_ids, p)])
    assert [e.finish_reason for e in first] == ["abort"]
    assert second[-1].finish_reason == "length" and sum(len(e.token_ids) for e in second) == 3
