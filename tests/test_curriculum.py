"""Curriculum (train/curriculum.py): the orders, the competence schedule, perplexity scores and their cache, batches
a pure function of (seed, step) so a resumed or 2-process run continues the same order, and one-line errors."""
from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

from conftest import read_metrics, save_tiny_sft_base

from lmforge.train.curriculum import CurriculumBatches, Schedule, competence, ranked
from lmforge.train.sft_data import Example


def examples(lengths: list[int]) -> list[Example]:
    return [Example(np.arange(n, dtype=np.int32) % 7 + 1, np.arange(n) >= n // 2) for n in lengths]


def test_competence_is_the_square_root_schedule_from_c0_to_all_data():
    c0, T = 0.1, 100
    assert competence(0, c0, T) == pytest.approx(0.1)
    assert competence(50, c0, T) == pytest.approx(math.sqrt(50 * (1 - 0.01) / 100 + 0.01))
    assert competence(100, c0, T) == 1.0 and competence(1000, c0, T) == 1.0
    values = [competence(t, c0, T) for t in range(0, 120)]
    assert values == sorted(values)
    assert competence(25, 0.5, 100) == pytest.approx(math.sqrt(0.25 * 0.75 + 0.25))

    scores = np.random.default_rng(0).random(1000)
    schedule = Schedule(ranked(scores, "competence", 7), "competence", c0, T, 7)
    assert schedule.pool(0) == 100 and schedule.pool(50) == math.ceil(1000 * competence(50, c0, T))
    assert schedule.pool(100) == 1000
    for step in (0, 10, 50, 99):
        drawn = scores[schedule.indices(step, 64)]
        assert drawn.max() <= np.sort(scores)[schedule.pool(step) - 1]  # only the easiest pool(t) examples
    late = scores[np.concatenate([schedule.indices(s, 64) for s in range(100, 110)])]
    assert late.max() > np.sort(scores)[500]  # after T the whole data set is drawn from
    assert np.array_equal(schedule.indices(3, 64), Schedule(schedule.rank, "competence", c0, T, 7).indices(3, 64))
    assert not np.array_equal(schedule.indices(3, 64), schedule.indices(4, 64))


def test_sorted_orders_go_easy_to_hard_and_hard_to_easy_epoch_after_epoch():
    lengths = [random.Random(0).randint(4, 40) for _ in range(48)]
    exs = examples(lengths)
    scores = np.array(lengths, dtype=float)
    for order, sign in (("easy_to_hard", 1), ("hard_to_easy", -1)):
        batches = CurriculumBatches(exs, Schedule(ranked(scores, order, 1), order, 0.1, 10, 1), False, 64, 0)
        seen = [len(exs[int(u[0])]) for s in range(18) for u in batches.units(s, 4)]  # 72 examples: 1.5 epochs
        assert seen[:48] == sorted(lengths, key=lambda n: sign * n)  # one epoch in order
        assert seen[48:] == seen[:24]  # the next epoch repeats it
        step3 = batches(3, 2, 2, 0, 1)  # micro-batches of step 3: its 4 examples, 2 per padding-free row
        assert [int(b["n_tokens"]) for b in step3] == [sum(seen[12:14]), sum(seen[14:16])]
    ties = np.zeros(200)  # ties are broken by the seed, not by position
    assert not np.array_equal(ranked(ties, "easy_to_hard", 1), ranked(ties, "easy_to_hard", 2))


def test_batches_are_a_function_of_seed_and_step_on_any_world_size():
    exs = examples([random.Random(1).randint(4, 30) for _ in range(40)])
    scores = np.array([len(e) for e in exs], dtype=float)
    for order, packing in (("competence", False), ("competence", True), ("easy_to_hard", True)):
        make = lambda: CurriculumBatches(exs, Schedule(ranked(scores, order, 3), order, 0.2, 8, 3), packing, 64, 0)
        one, fresh = make(), make()
        for step in (5, 2, 7):  # any step, in any order, from a fresh object (a resumed run)
            a = one(step, 2, 2, 0, 1)
            b = fresh(step, 2, 2, 0, 1)
            assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
            two = [fresh(step, 2, 1, r, 2)[0] for r in (0, 1)]  # 2 ranks x 2 rows = the same global batch
            assert [int(x["n_tokens"]) for x in a] == [int(x["n_tokens"]) for x in two]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny Llama with a character tokenizer and Alpaca-shaped records carrying a numeric `level` field."""
    d = tmp_path_factory.mktemp("curriculum")
    rng = random.Random(0)
    rows = []
    for _ in range(96):
        a, b = rng.randint(0, 99), rng.randint(0, 9999)
        rows.append({"instruction": f"add {a} and {b}", "input": "", "output": f"{a + b}", "level": len(str(b))})
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_tiny_sft_base(d / "base", "0123456789 add")
    return {"base": d / "base", "data": d / "data.jsonl", "dir": d}


def test_perplexity_scores_are_each_examples_own_sft_loss(tiny):
    """Examples scored side by side in one padding-free row get the loss each has alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.curriculum import example_nll
    from lmforge.train.finetune import sft_loss
    from lmforge.train.sft_data import SFTDataConfig, collate, load_sft_data

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    data = load_sft_data(SFTDataConfig(path=str(tiny["data"]), val_size=0, max_examples=12), tok, 0)
    model = AutoModelForCausalLM.from_pretrained(tiny["base"]).eval()
    scores = example_nll(model, data.train, torch.device("cpu"))
    with torch.no_grad():
        alone = [float(sft_loss(model, collate(data.train, [np.array([i])], 0))[0]) for i in range(12)]
    np.testing.assert_allclose(scores, alone, rtol=1e-4)


def ft_config(tiny: dict, out, *extra: str):
    from lmforge.config import load_config
    from lmforge.train.config import FinetuneConfig

    return load_config(FinetuneConfig, None, [
        f"base_model={tiny['base']}", f"data.path={tiny['data']}", f"out_dir={out}", "method=lora",
        "lora.target_modules=all-linear", "lora.dropout=0", "train.device=cpu", "train.threads=1",
        "train.precision=fp32", "train.micro_batch_size=4", "train.lr=3e-3", "train.warmup_steps=0",
        "train.log_every=1", "train.eval_every=0", "data.val_size=8", "data.max_length=256",
        "log.progress=false", "log.tensorboard=false", *extra])


def test_finetune_resumes_the_same_curriculum_and_reuses_cached_scores(tiny, tmp_path, capsys):
    from lmforge.train.finetune import finetune

    cur = ["curriculum.difficulty=perplexity", "curriculum.order=competence", "curriculum.c0=0.25",
           "curriculum.competence_steps=6"]
    finetune(ft_config(tiny, tmp_path / "full", "train.max_steps=6", *cur))
    assert "curriculum: scored 88 examples by perplexity" in capsys.readouterr().out
    reference = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r}

    out = tmp_path / "resumed"
    finetune(ft_config(tiny, out, "train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5", *cur))
    capsys.readouterr()
    shutil.rmtree(out / "checkpoints" / "step-0000006")  # as if killed after the checkpoint of step 3
    (out / "checkpoints" / "latest").write_text("step-0000003\n")
    finetune(ft_config(tiny, out, "train.max_steps=6", "train.ckpt_every=3", "train.keep_last=5", *cur))
    second = capsys.readouterr().out
    assert "curriculum: reusing the scores" in second and "curriculum: scored" not in second
    resumed = {r["step"]: r["loss"] for r in read_metrics(out) if "loss" in r}
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(reference[s], rel=1e-6), (s, resumed[s], reference[s])
    assert [r for r in read_metrics(out) if r.get("event") == "resumed"]


def test_field_difficulty_orders_by_the_records_values_and_bad_input_is_one_line(tiny, char_shards, tmp_path):
    from transformers import AutoTokenizer

    from lmforge.config import ConfigError, load_config
    from lmforge.errors import UserError
    from lmforge.train.config import FinetuneConfig, PretrainConfig
    from lmforge.train.curriculum import sft_curriculum
    from lmforge.train.distributed import Runtime
    from lmforge.train.sft_data import SFTDataConfig, load_sft_data

    tok = AutoTokenizer.from_pretrained(tiny["base"])
    data = load_sft_data(SFTDataConfig(path=str(tiny["data"]), val_size=0), tok, 0, difficulty_field="level")
    cfg = ft_config(tiny, tmp_path, "curriculum.difficulty=field", "curriculum.field=level",
                    "curriculum.order=easy_to_hard")
    batches = sft_curriculum(cfg.curriculum, data.train, tok, str(tiny["base"]), 0, False, 256, 0, 10, tmp_path,
                             Runtime())
    levels = [data.train[i].difficulty for s in range(24) for i in batches.units(s, 4) for i in i]
    assert levels == sorted(levels) and levels[0] < levels[-1]

    with pytest.raises(UserError, match=r"data.jsonl:1: curriculum.field 'nope' is missing") as e:
        load_sft_data(SFTDataConfig(path=str(tiny["data"])), tok, 0, difficulty_field="nope")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="curriculum.field 'instruction' is not a number"):
        load_sft_data(SFTDataConfig(path=str(tiny["data"])), tok, 0, difficulty_field="instruction")
    base = [f"base_model={tiny['base']}", f"data.path={tiny['data']}"]
    for bad, key in (("curriculum.c0=0", "curriculum.c0"), ("curriculum.c0=1.5", "curriculum.c0"),
                     ("curriculum.competence_steps=0", "curriculum.competence_steps"),
                     ("curriculum.order=random", "curriculum.order"),
                     ("curriculum.difficulty=field", "curriculum.field")):
        with pytest.raises(ConfigError, match=key) as e:
            load_config(FinetuneConfig, None, [*base, bad])
        assert "\n" not in str(e.value), str(e.value)
    with pytest.raises(ConfigError, match="curriculum.reference_model"):
        load_config(PretrainConfig, None, [f"data.dir={char_shards}", "curriculum.order=competence"])
    with pytest.raises(ConfigError, match="length and field are for fine-tuning"):
        load_config(PretrainConfig, None, [f"data.dir={char_shards}", "curriculum.difficulty=length"])


def test_pretraining_windows_come_easiest_first_from_a_reference_models_scores(tmp_path, capsys):
    """Pretraining examples are fixed windows scored by the reference; a run takes them in that order."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import TINY, synthetic_text
    from lmforge.config import load_config
    from lmforge.tokens.shards import read_meta, write_shards
    from lmforge.train.config import PretrainConfig
    from lmforge.train.curriculum import n_windows, window_curriculum
    from lmforge.train.data import PretrainData
    from lmforge.train.distributed import Runtime
    from lmforge.train.pretrain import pretrain

    (tmp_path / "input.txt").write_text(synthetic_text(12_000) + "zq" * 300)  # a hard, unseen tail
    write_shards(tmp_path / "input.txt", "char", tmp_path / "shards")
    vocab = int(read_meta(tmp_path / "shards")["vocab_size"])
    torch.manual_seed(0)
    ref = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    text = torch.from_numpy(PretrainData.open(load_config(PretrainConfig, None, [f"data.dir={tmp_path / 'shards'}"]).data,
                                              None).train[0][:4000].astype(np.int64))
    for _ in range(30):  # a reference that knows the grammar, not the tail
        x = text[:3200].view(100, 32)
        loss = ref(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    ref.save_pretrained(tmp_path / "ref")

    out = tmp_path / "run"
    cfg = load_config(PretrainConfig, None, [f"data.dir={tmp_path / 'shards'}", f"out_dir={out}", *TINY,
                                             "train.max_steps=2", "curriculum.order=easy_to_hard",
                                             f"curriculum.reference_model={tmp_path / 'ref'}"])
    pretrain(cfg)
    assert "curriculum: scored" in capsys.readouterr().out
    tokens = PretrainData.open(cfg.data, None).train[0]
    sampler = window_curriculum(cfg.curriculum, tokens, 32, 4, cfg.seed, 2, vocab, out, Runtime())
    assert "curriculum: reusing the scores" in capsys.readouterr().out
    scores = np.load(next(out.glob("curriculum-*.npy")))
    assert len(scores) == n_windows(tokens, 32)
    first = sampler.starts(0) // 32
    assert set(first.tolist()) == set(np.argsort(scores, kind="stable")[:4].tolist())
    tail = np.arange(len(scores)) * 32 > len(tokens) - 600
    assert scores[tail].mean() > scores[~tail].mean()  # the unseen tail is what the reference finds hard
