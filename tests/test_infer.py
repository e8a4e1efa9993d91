"""The inference runtime: the runner against transformers, the engine's continuous batching, sampling and stops."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from conftest import greedy_reference
from lmforge.infer import Engine, QueueFull, Request, SamplingParams
from lmforge.infer.runner import Runner


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

    from lmforge.infer import check_supported

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


@pytest.mark.slow
def test_smollm2_greedy_batch_equals_model_generate(smollm2_cache, monkeypatch):
    """The real model: six chat prompts decoded together (joining at different steps) give exactly
    model.generate's greedy tokens, EOS included."""
    from lmforge.infer import eos_ids
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


# ---- loading, the dtype policy and the one Generator ---------------------------------------------

def test_load_for_inference_applies_the_device_and_dtype_policy(tiny):
    from lmforge.device import DeviceError
    from lmforge.infer import load_for_inference

    m = load_for_inference(tiny, device="cpu")
    assert m.dtype == torch.float32 and next(m.model.parameters()).dtype == torch.float32  # CPU: fp32 unless asked
    assert m.device.type == "cpu" and not m.model.training and m.runner_supported
    assert m.eos_ids == [m.tokenizer.eos_token_id]
    assert next(load_for_inference(tiny, device="cpu", dtype="bfloat16").model.parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="^device=cuda but no CUDA device is visible$"):
            load_for_inference(tiny, device="cuda")


def test_generator_engine_and_fallback_agree_on_greedy_text_with_stop_strings(hf):
    from lmforge.infer import Generator, InferenceModel

    model, tok = hf
    m = InferenceModel.of(model, tok)
    prompts = [tok(p).input_ids for p in ("hello there", "a", "the quick brown fox")]
    greedy = SamplingParams(max_tokens=12, temperature=0)
    with Generator(m) as engine, Generator(m, engine=False) as fallback:
        full = engine.generate(prompts, greedy)
        assert [c.text for c in full] == [c.text for c in fallback.generate(prompts, greedy)]
        assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in full)
        stop = full[0].text[3:5]
        stopped = SamplingParams(max_tokens=12, temperature=0, stop=[stop])
        for g in (engine, fallback):
            [c] = g.generate(prompts[:1], stopped)
            assert c.text == full[0].text[:full[0].text.index(stop)] and c.finish_reason == "stop"


def test_generator_samples_n_sequences_with_their_own_seeds_and_refuses_too_long_prompts(hf):
    from lmforge.infer import Generator, InferenceModel

    model, tok = hf
    m = InferenceModel.of(model, tok)
    ids = tok("once upon").input_ids
    with Generator(m, max_model_len=64) as g:
        params = SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=3, ignore_eos=True)
        a, b = g.generate([ids], params), g.generate([ids], params)
        assert [c.token_ids for c in a] == [c.token_ids for c in b]  # seeded: reproducible
        assert len({tuple(c.token_ids) for c in a}) == 3  # each sequence draws from its own generator
        with pytest.raises(ValueError, match="prompt 1 is 64 tokens, as long as the model's context"):
            g.generate([[1] * 64], params)
        [c] = g.generate([[1] * 60], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert len(c.token_ids) == 4 and c.finish_reason == "length"  # max_tokens cut to the room left
    with Generator(m, engine=False) as fallback, pytest.raises(ValueError, match="logprobs, ignore_eos: not supported"):
        fallback.generate([ids], SamplingParams(max_tokens=2, logprobs=1, ignore_eos=True))


def test_generate_renders_the_alpaca_template(tiny):
    from lmforge.infer import generate_samples
    from lmforge.tokens.chat import alpaca_template

    [s] = generate_samples(tiny, "Add 2 and 2.", max_new_tokens=3, temperature=0, template="alpaca", inp="2, 2",
                           device="cpu")
    assert s.text.startswith(alpaca_template("Add 2 and 2.", "2, 2")) and s.n_tokens <= 3
