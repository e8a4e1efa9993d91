"""Regenerate the merge parity fixtures: three tiny Llamas (a base and two perturbed copies), the YAML configs,
and mergekit-yaml's output for each config (expected/NAME.safetensors), which tests/test_merge.py compares with
`lmforge merge` without mergekit installed.

mergekit pins its own torch and transformers, so it lives in its own venv, never in .venv:
    python3 -m venv .venv-mergekit && .venv-mergekit/bin/pip install mergekit torch==2.13.0
    .venv/bin/python tests/data/merge/make.py [--mergekit .venv-mergekit/bin/mergekit-yaml]
"""
from __future__ import annotations

import argparse
import os
import shutil
import string
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]

# name -> YAML; model paths are relative to this directory (both tools run with it as the working directory).
CONFIGS = {
    "linear": """\
models:
  - model: models/a
    parameters:
      weight: [0.2, 0.8]
  - model: models/b
    parameters:
      weight:
        - filter: self_attn
          value: 0.5
        - filter: mlp
          value: [0.1, 0.4, 0.9]
        - value: 1.0
merge_method: linear
dtype: float32
""",
    "linear_bf16": """\
models:
  - model: models/a
    parameters:
      weight: 0.7
  - model: models/b
    parameters:
      weight: 0.3
merge_method: linear
parameters:
  normalize: false
dtype: bfloat16
""",
    "slerp": """\
models:
  - model: models/base
  - model: models/a
merge_method: slerp
base_model: models/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
    "task_arithmetic": """\
models:
  - model: models/a
    parameters:
      weight: 0.6
  - model: models/b
    parameters:
      weight:
        - filter: mlp
          value: [0.2, 0.7]
        - value: 0.4
base_model: models/base
merge_method: task_arithmetic
parameters:
  lambda: 0.8
dtype: float32
""",
    "ties": """\
models:
  - model: models/base
  - model: models/a
    parameters:
      density: 0.5
      weight: 0.6
  - model: models/b
    parameters:
      density: [0.3, 0.9]
      weight: 0.4
merge_method: ties
base_model: models/base
parameters:
  normalize: true
  int8_mask: true
dtype: float32
""",
    "dare_ties": """\
models:
  - model: models/a
    parameters:
      density: 1.0
      weight: 0.7
  - model: models/b
    parameters:
      density: 1.0
      weight: 0.5
merge_method: dare_ties
base_model: models/base
dtype: float32
""",
    "dare_linear": """\
models:
  - model: models/a
    parameters:
      weight: 0.5
  - model: models/b
    parameters:
      weight: 0.5
merge_method: dare_linear
base_model: models/base
parameters:
  density: 1.0
  normalize: true
dtype: float32
""",
    "breadcrumbs": """\
models:
  - model: models/a
    parameters:
      weight: 1.0
      density: 0.8
      gamma: 0.05
  - model: models/b
    parameters:
      weight: 0.5
      density: 0.9
merge_method: breadcrumbs
base_model: models/base
dtype: float32
""",
    "model_stock": """\
models:
  - model: models/a
  - model: models/b
merge_method: model_stock
base_model: models/base
dtype: float32
""",
    # random: compared statistically (kept fraction, L1 rescaling), not tensor for tensor
    "dare_linear_random": """\
models:
  - model: models/a
    parameters:
      weight: 1.0
      density: 0.3
merge_method: dare_linear
base_model: models/base
dtype: float32
""",
}


def make_models(models: Path) -> None:
    """base: a random 4-layer Llama (tied embeddings, like SmolLM2) with a character tokenizer; a, b: base plus
    independent noise of the weights' own scale, so task vectors disagree in sign."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.tokenizer import build_char_tokenizer

    shutil.rmtree(models, ignore_errors=True)
    build_char_tokenizer(string.printable, models / "base")
    tok = AutoTokenizer.from_pretrained(models / "base")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=24, num_hidden_layers=4,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(models / "base")
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        model.save_pretrained(models / name)
        tok.save_pretrained(models / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", default=str(ROOT / ".venv-mergekit/bin/mergekit-yaml"))
    ap.add_argument("--keep-models", action="store_true", help="reuse models/ (only rerun mergekit)")
    args = ap.parse_args()
    if not args.keep_models:
        make_models(HERE / "models")
    for d in ("configs", "expected"):
        shutil.rmtree(HERE / d, ignore_errors=True)
        (HERE / d).mkdir()
    for name, text in CONFIGS.items():
        (HERE / "configs" / f"{name}.yaml").write_text(text)
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([args.mergekit, f"configs/{name}.yaml", tmp, "--random-seed", "0",
                                   "--no-write-model-card"],  # the card looks models/a up on the hub
                                  cwd=HERE, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if proc.returncode != 0:
                raise SystemExit(f"mergekit-yaml failed on {name}:\n{proc.stderr[-3000:]}")
            shutil.copy(Path(tmp) / "model.safetensors", HERE / "expected" / f"{name}.safetensors")
        print(f"{name}: mergekit output saved")


if __name__ == "__main__":
    main()
