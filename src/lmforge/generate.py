"""`lmforge generate` and `lmforge chat`: sample from any model spec the loader accepts.

A spec is an alias (smollm2-135m-instruct), a .gguf file, an HF model or checkpoint directory, a run's
out_dir (its latest checkpoint), a LoRA adapter directory, or a hub id; see lmforge.model.load.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Sample:
    """One sample: `text` (prompt + continuation, or only the reply with a chat template), how many tokens were
    generated (EOS included), and whether it ended with EOS (False: it hit max_new_tokens)."""
    text: str
    n_tokens: int
    finished: bool


def eos_ids(model, tok) -> list[int]:
    """Every token that ends a sample: the generation config's EOS id(s) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _sample(model, tok, ids: list[int], num_samples: int, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, streamer=None) -> list[tuple[list[int], bool]]:
    """(new tokens before the first EOS, whether there was one) for each of `num_samples` rows."""
    import torch

    dev = next(model.parameters()).device
    input_ids = torch.tensor([ids] * num_samples, device=dev)
    stops = eos_ids(model, tok)
    greedy = temperature <= 0
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
                             do_sample=not greedy, temperature=None if greedy else temperature,
                             top_k=None if greedy else top_k, top_p=None if greedy else top_p,
                             eos_token_id=stops or None, pad_token_id=tok.pad_token_id, streamer=streamer)
    rows = []
    for row in out[:, len(ids):].tolist():
        end = next((i for i, t in enumerate(row) if t in stops), None)
        rows.append((row, False) if end is None else (row[:end], True))
    return rows


def generate_samples(model_path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int | None = 200, num_samples: int = 1, seed: int = 1337, device: str = "auto",
                     top_p: float | None = None, chat_template: bool = False) -> list[Sample]:
    """Sample `num_samples` continuations of `prompt`, each stopping at EOS; chat_template wraps the prompt as
    one user message."""
    import torch

    from lmforge.model.load import load_model, load_tokenizer
    from lmforge.device import pick_device

    tok = load_tokenizer(model_path)
    model = load_model(model_path, device=pick_device(device), merge_adapter=True).eval()
    if chat_template:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
    elif not prompt:  # start a fresh document: after EOS, or after a newline for char-level models
        ids = [tok.eos_token_id] if tok.eos_token_id is not None else tok.encode("\n")
    else:
        ids = tok.encode(prompt)
    torch.manual_seed(seed)
    rows = _sample(model, tok, ids, num_samples, max_new_tokens, temperature, top_k, top_p)
    head = "" if chat_template else prompt
    return [Sample(head + tok.decode(new, skip_special_tokens=True), len(new) + done, done) for new, done in rows]


def generate(model_path: str | Path, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, num_samples: int = 1, seed: int = 1337, device: str = "auto",
             top_p: float | None = None, chat_template: bool = False) -> list[str]:
    """The texts of generate_samples."""
    return [s.text for s in generate_samples(model_path, prompt, max_new_tokens, temperature, top_k, num_samples,
                                             seed, device, top_p, chat_template)]


def chat(spec: str | Path, *, system: str | None = None, max_new_tokens: int = 256, temperature: float = 0.7,
         top_p: float | None = 0.9, top_k: int | None = None, seed: int = 1337, device: str = "auto",
         input=sys.stdin, output=sys.stdout) -> list[dict]:
    """Chat in the terminal: `you> ` lines in, streamed `assistant> ` replies out; /reset clears the history,
    /exit or EOF quits. Returns the conversation as it stands at exit."""
    import torch
    from transformers import TextStreamer

    from lmforge.model.load import load_model, load_tokenizer
    from lmforge.device import pick_device

    class Streamer(TextStreamer):
        """TextStreamer that writes to `output` instead of printing."""

        def on_finalized_text(self, text: str, stream_end: bool = False):
            output.write(text)
            output.flush()

    tok = load_tokenizer(spec)
    model = load_model(spec, device=pick_device(device), merge_adapter=True).eval()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    torch.manual_seed(seed)
    output.write(f"chatting with {spec}; /reset clears the history, /exit quits\n")
    while True:
        output.write("you> ")
        output.flush()
        line = input.readline()
        if not line:
            output.write("\n")
            return messages
        line = line.strip()
        if not input.isatty():  # piped input: echo it, so the transcript reads like a terminal session
            output.write(line + "\n")
        if line == "/exit":
            return messages
        if line == "/reset":
            messages = list(start)
            output.write("(history cleared)\n")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        output.write("assistant> ")
        [(new, finished)] = _sample(model, tok, ids, 1, max_new_tokens, temperature, top_k, top_p,
                                    streamer=Streamer(tok, skip_prompt=True, skip_special_tokens=True))
        output.write("\n" if finished else f"\n[cut off at max_new_tokens={max_new_tokens}]\n")
        messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True).strip()})
