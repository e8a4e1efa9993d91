"""`lmforge generate`: sample from any HF model directory, checkpoint, or a run's latest checkpoint."""
from __future__ import annotations

from pathlib import Path


def resolve_model_dir(path: str | Path) -> Path:
    """A run's out_dir resolves to its latest checkpoint; a checkpoint or HF directory is used as is."""
    path = Path(path)
    if (path / "checkpoints" / "latest").is_file():
        from lmforge.train.checkpoint import latest_checkpoint
        return latest_checkpoint(path / "checkpoints")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory (no config.json) nor a run with checkpoints/latest")
    return path


def generate(model_path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, num_samples: int = 1, seed: int = 1337, device: str = "auto") -> list[str]:
    """Sample `num_samples` continuations of `prompt` with transformers' generate()."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.train.distributed import pick_device

    model_dir = resolve_model_dir(model_path)
    dev = pick_device(device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(dev).eval()
    if not prompt:  # start a fresh document: after EOS, or after a newline for char-level models
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else tok.encode("\n")
    else:
        ids = tok.encode(prompt)
    input_ids = torch.tensor([ids] * num_samples, device=dev)
    torch.manual_seed(seed)
    greedy = temperature <= 0
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, temperature=None if greedy else temperature,
                             top_k=None if greedy else top_k, top_p=None, pad_token_id=tok.eos_token_id)
    return [prompt + tok.decode(row[len(ids):], skip_special_tokens=True) for row in out]
