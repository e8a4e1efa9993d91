"""Engine components in isolation: sampler, schedule, parameter groups, guards, model equivalence."""
from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch

from lmforge.model.config import ModelConfig, n_params
from lmforge.model.llama import LeanLlama, hf_to_lean, lean_to_hf
from lmforge.train.config import GuardConfig
from lmforge.train.data import WindowSampler, micro_batches
from lmforge.train.guards import REASONS, StepGuard
from lmforge.train.optim import param_groups
from lmforge.train.schedule import lr_at


def test_sampler_is_a_function_of_seed_and_step_and_split_across_ranks():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = WindowSampler(tokens, seq_len=16, global_batch=8, seed=3)
    b = WindowSampler(tokens, seq_len=16, global_batch=8, seed=3)
    assert np.array_equal(a.starts(5), b.starts(5)) and not np.array_equal(a.starts(5), a.starts(6))
    x, y = a.batch(5, 0, 8)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.dtype == torch.int64  # targets are inputs shifted by one

    def windows(world, accum):
        got = []
        for rank in range(world):
            for x, _ in micro_batches(a, 7, 8 // (world * accum), accum, rank, world):
                got += [tuple(row.tolist()) for row in x]
        return sorted(got)
    one = windows(1, 1)
    assert windows(2, 1) == one and windows(2, 2) == one and windows(1, 4) == one


def test_sequential_sampling_walks_the_shard_in_order():
    s = WindowSampler(np.arange(1000, dtype=np.uint16), seq_len=10, global_batch=4, seed=0, sampling="sequential")
    assert s.starts(0).tolist() == [0, 10, 20, 30] and s.starts(1).tolist() == [40, 50, 60, 70]
    assert s.starts(24).tolist() == [960, 970, 980, 0]  # 99 windows per epoch, then it wraps around


def test_schedule_warmup_cosine_linear_constant():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=100, decay_steps=2000)
    assert lr_at(0, **kw) == pytest.approx(1e-3 / 101)
    assert lr_at(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert lr_at(100, **kw) == pytest.approx(1e-3)
    assert lr_at(1050, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cos = 0
    assert lr_at(2000, **kw) == pytest.approx(1e-4) and lr_at(5000, **kw) == pytest.approx(1e-4)
    assert lr_at(1050, **kw, kind="linear") == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert lr_at(1500, **kw, kind="constant") == 1e-3


def test_no_weight_decay_on_norms_and_embeddings():
    m = LeanLlama(ModelConfig(preset="tiny", vocab_size=50))
    decay, no_decay = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_ids = {id(p) for p in no_decay["params"]}
    assert id(m.embed.weight) in no_ids and id(m.norm.weight) in no_ids
    assert all(p.dim() == 2 for p in decay["params"]) and id(m.blocks[0].qkv.weight) not in no_ids
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in m.parameters())  # the tied head is counted once
    assert total == n_params(m.cfg, include_embeddings=True)


def _verdict(g: StepGuard, loss: float, norm: float = 1.0) -> str | None:
    return REASONS[int(g.verdict(torch.tensor(loss, dtype=torch.float64), torch.tensor(norm)))]


def _keep(g: StepGuard, loss: float, skipped: bool = False) -> str | None:
    """One step as the loop takes it: the device window at once, the host's counters when it reads."""
    g.accept(torch.tensor(loss, dtype=torch.float64), torch.tensor(skipped))
    return g.record(loss, skipped)


def test_guard_skips_nonfinite_and_spikes_then_asks_for_rollback():
    g = StepGuard(GuardConfig(spike_factor=3.0, spike_warmup=5, max_bad_steps=2))
    for _ in range(10):
        assert _verdict(g, 2.0) is None
        _keep(g, 2.0)
    assert _verdict(g, float("nan")) == "nonfinite" and _verdict(g, 2.0, math.inf) == "nonfinite"
    assert _verdict(g, 7.0) == "spike" and _verdict(g, 5.9) is None
    assert _keep(g, 7.0, skipped=True) is None
    assert _keep(g, 7.0, skipped=True) == "rollback"
    restored = StepGuard(GuardConfig())
    restored.load_state_dict(g.state_dict())
    assert restored.state_dict() == g.state_dict()


def test_the_device_verdict_is_the_median_rule_of_the_kept_losses():
    """The device decides as statistics.median over the last spike_window kept losses would, through window
    wrap-around, even counts (mean of the middle two), skipped steps, and a rebuild from a checkpoint's state."""
    cfg = GuardConfig(spike_factor=1.3, spike_window=4, spike_warmup=3)
    g, kept, seen = StepGuard(cfg), [], 0
    rng = random.Random(0)
    for i in range(60):
        loss = rng.uniform(1.0, 2.0) * (3 if i % 7 == 6 else 1)
        recent = kept[-cfg.spike_window:]
        expect = "spike" if seen >= cfg.spike_warmup and recent and loss > 1.3 * statistics.median(recent) else None
        assert _verdict(g, loss) == expect, i
        _keep(g, loss, skipped=expect is not None)
        if expect is None:
            kept.append(loss)
            seen += 1
        if i == 30:  # resume: the device window is rebuilt from the host's state
            saved, g = g.state_dict(), StepGuard(cfg)
            g.load_state_dict(saved)
    assert list(g.recent) == kept[-cfg.spike_window:] and g.seen == seen


@pytest.mark.parametrize("kv_heads, tie", [(4, True), (2, False)])
def test_lean_llama_equals_transformers_llama(kv_heads, tie):
    from transformers import LlamaForCausalLM
    cfg = ModelConfig(preset="tiny", vocab_size=97, num_kv_heads=kv_heads, tie_embeddings=tie)
    torch.manual_seed(0)
    lean = LeanLlama(cfg).eval()
    hf = LlamaForCausalLM(cfg.to_hf_config()).eval()
    hf.load_state_dict(lean_to_hf(lean.state_dict(), cfg), strict=not tie)
    x = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.allclose(lean(x), hf(x).logits, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the explicit-attention path
            assert torch.allclose(lean(x).float(), hf(x).logits.float(), atol=0.1)
    back = LeanLlama(cfg)
    back.load_state_dict(hf_to_lean(hf.state_dict(), cfg))
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), lean.state_dict().values()))


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(preset="tiny", vocab_size=50)
    torch.manual_seed(0)
    m = LeanLlama(cfg)
    x = torch.randint(0, 50, (2, 16))
    m(x).logsumexp(-1).mean().backward()
    ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(x).logsumexp(-1).mean().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(ref, m.parameters()))


def test_model_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ModelConfig(preset=None, hidden_size=100, num_layers=1, num_heads=3, intermediate_size=8, max_seq_len=8)
    with pytest.raises(ValueError, match="give hidden_size"):
        ModelConfig(preset=None)
