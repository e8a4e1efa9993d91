"""lmforge merge: equal to mergekit-yaml on its own YAML (fixtures made by tests/data/merge/make.py), DARE's random
pruning by its statistics, adapters and sharded output, one-line errors, and a merged model that generates."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import require, run_cli, save_tiny
from lmforge.config import read_yaml, validate
from lmforge.errors import UserError
from lmforge.model.merge import MergeConfig, merge_models
from lmforge.model.sharded import read_safetensors

DATA = Path(__file__).parent / "data" / "merge"
EXACT = ["linear", "linear_bf16", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
         "model_stock"]


def merge(config: dict, out: Path, **extra):
    return merge_models(validate(MergeConfig, {**config, "out": str(out), **extra}))


def weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "models" / name / "model.safetensors"))


@pytest.fixture
def in_data(monkeypatch):
    """The fixtures' YAML names models relative to tests/data/merge, as mergekit-yaml was run there."""
    monkeypatch.chdir(DATA)


@pytest.mark.parametrize("name", EXACT)
def test_equal_to_mergekit(name, in_data, tmp_path):
    info = merge(read_yaml(DATA / "configs" / f"{name}.yaml"), tmp_path / "out")
    ours, theirs = read_safetensors(tmp_path / "out"), load_file(str(DATA / "expected" / f"{name}.safetensors"))
    assert sorted(ours) == sorted(theirs) and info["tensors"] == len(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert (ours[k].double() - theirs[k].double()).abs().max().item() <= 1e-6, k
    inputs = [weights(m) for m in ("base", "a", "b")]  # a merge equal to an input would prove nothing
    assert all(any(not torch.equal(ours[k], w[k]) for k in ours) for w in inputs)


def dare_stats(out: dict, density_of=None) -> tuple[float, float]:
    """(kept fraction of the task vector, worst deviation of kept/original from the tensor's L1 rescale factor)."""
    base, a = weights("base"), weights("a")
    kept = total = 0
    worst = 0.0
    for k in base:
        delta, merged = a[k] - base[k], out[k] - base[k]
        mask = merged != 0
        kept, total = kept + int(mask.sum()), total + mask.numel()
        scale = delta.abs().sum() / delta[mask].abs().sum()
        worst = max(worst, ((merged[mask] / delta[mask]) - scale).abs().max().item() / scale.item())
    return kept / total, worst


def test_dare_prunes_at_random_to_density_and_rescales_like_mergekit(in_data, tmp_path):
    """density 0.3 over ~10k entries: both tools keep 30% ± 2% and scale each kept entry by the tensor's L1 ratio;
    the same seed gives the same merge, another seed another one."""
    config = read_yaml(DATA / "configs" / "dare_linear_random.yaml")
    merge(config, tmp_path / "s0", random_seed=0)
    merge(config, tmp_path / "s0again", random_seed=0)
    merge(config, tmp_path / "s1", random_seed=1)
    ours, again, other = (read_safetensors(tmp_path / d) for d in ("s0", "s0again", "s1"))
    for out in (ours, load_file(str(DATA / "expected" / "dare_linear_random.safetensors"))):
        fraction, worst = dare_stats(out)
        assert abs(fraction - 0.3) < 0.02 and worst < 1e-4, (fraction, worst)
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    assert any(not torch.equal(ours[k], other[k]) for k in ours)


def test_sharded_output_equals_one_file_and_carries_tokenizer_and_config(in_data, tmp_path):
    config = read_yaml(DATA / "configs" / "ties.yaml")
    merge(config, tmp_path / "one")
    merge(config, tmp_path / "many", max_shard_bytes=8_000)
    one, many = read_safetensors(tmp_path / "one"), read_safetensors(tmp_path / "many")
    assert len(list((tmp_path / "many").glob("model-*-of-*.safetensors"))) > 3
    assert all(torch.equal(one[k], many[k]) for k in one) and sorted(one) == sorted(many)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "mergekit_config.yml"):
        assert (tmp_path / "many" / f).is_file(), f
    assert read_yaml(tmp_path / "many" / "mergekit_config.yml")["merge_method"] == "ties"


def test_lora_adapter_is_merged_onto_its_base_first(tmp_path):
    """A PEFT adapter as an input counts as base + adapter merged: a 0.5/0.5 linear merge of the base and its
    adapter is the midpoint of the base and `lmforge export --merge-lora`'s model."""
    peft = require("peft")
    from transformers import AutoModelForCausalLM

    from lmforge.model.export import export_model

    base = save_tiny(tmp_path / "base", seed=0)
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                                peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    export_model(tmp_path / "adapter", tmp_path / "full", merge_lora=True)
    merge({"models": [{"model": str(base), "parameters": {"weight": 0.5}},
                      {"model": str(tmp_path / "adapter"), "parameters": {"weight": 0.5}}],
           "merge_method": "linear"}, tmp_path / "out")
    out, b, full = (read_safetensors(tmp_path / d) for d in ("out", "base", "full"))
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(b[k], full[k])
    assert torch.allclose(out[k], (b[k] + full[k]) / 2, atol=1e-6)
    assert not any(p.name.startswith(".merge-") for p in tmp_path.iterdir())  # the scratch export is gone


def one_line(config: dict, out: Path) -> str:
    with pytest.raises(UserError) as e:
        merge(config, out)
    assert "\n" not in str(e.value) and not out.exists()
    return str(e.value)


def test_bad_configs_are_one_line_errors_and_write_nothing(in_data, tmp_path):
    ties = read_yaml(DATA / "configs" / "ties.yaml")
    out = tmp_path / "out"
    assert "unknown merge method 'frankenmerge'" in one_line({**ties, "merge_method": "frankenmerge"}, out)
    assert "slices: unknown key" in one_line({**ties, "slices": []}, out)
    assert "parameters.t: unknown parameter for ties" in one_line({**ties, "parameters": {"t": 0.5}}, out)
    assert "base_model: ties needs a base model" in one_line({**ties, "base_model": None}, out)
    assert "`union`" in one_line({**ties, "tokenizer_source": "union"}, out)
    no_weight = {"models": [{"model": "models/a"}, {"model": "models/b"}], "merge_method": "linear"}
    assert "missing parameter 'weight' for models/a tensor" in one_line(no_weight, out)
    bad_filter = {**no_weight, "parameters": {"weight": [{"filter": "mlp", "val": 1}]}}
    assert "parameters.weight[0]: a filter entry has `value`" in one_line(bad_filter, out)


def test_different_vocabularies_name_the_first_tensor_or_token(in_data, tmp_path):
    """A wider vocabulary differs first in the embedding (named with both shapes); the same size with other
    tokens is caught from the tokenizers before the embeddings are averaged into nonsense."""
    small = save_tiny(tmp_path / "small", seed=0)
    ties = read_yaml(DATA / "configs" / "ties.yaml")
    other = {**ties, "models": ties["models"][:2] + [{"model": str(small), "parameters": {"weight": 0.4}}]}
    msg = one_line(other, tmp_path / "out")
    assert msg.startswith(f"cannot merge {small} with models/base: tensor model.embed_tokens.weight is [")
    assert "(different architectures or vocabularies)" in msg
    shutil.copytree(DATA / "models" / "b", tmp_path / "b")
    tok = json.loads((tmp_path / "b" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (tmp_path / "b" / "tokenizer.json").write_text(json.dumps(tok))
    swapped = {**ties, "models": ties["models"][:2] + [{"model": str(tmp_path / "b"), "parameters": {"weight": 0.4}}]}
    assert "different vocabularies (token id" in one_line(swapped, tmp_path / "out")


def test_cli_linear_merge_of_two_finetunes_generates(tmp_path):
    """The guide's merge: two slightly different models averaged by `lmforge merge`, then `lmforge generate`
    on the output; a bad method from the command line exits 2 with one line."""
    for name, seed in (("ft1", 1), ("ft2", 2)):
        save_tiny(tmp_path / name, seed=seed)
    config = tmp_path / "merge.yaml"
    config.write_text(f"models:\n  - model: {tmp_path / 'ft1'}\n    parameters:\n      weight: 0.5\n"
                      f"  - model: {tmp_path / 'ft2'}\n    parameters:\n      weight: 0.5\n"
                      "merge_method: linear\ndtype: float32\n")
    proc = run_cli("merge", str(config), "--out", str(tmp_path / "merged"))
    assert "merged 2 models with linear: 21 tensors" in proc.stdout
    gen = run_cli("generate", str(tmp_path / "merged"), "Hello", "--max-new-tokens", "5", "--temperature", "0")
    assert gen.stdout.strip()
    bad = run_cli("merge", str(config), "--out", str(tmp_path / "x"), "merge_method=nope", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown merge method" in bad.stderr


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "configs" / "merge").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    from lmforge.model.merge import METHODS, _check_parameters

    cfg = validate(MergeConfig, {**read_yaml(path), "out": "unused"})
    _check_parameters(cfg, METHODS[cfg.merge_method])

