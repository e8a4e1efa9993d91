"""Prompt rendering and stop tokens, the same for every command that generates.

`none` encodes the text as it is, `chat` wraps it as one user turn in the tokenizer's chat template
(with the assistant's generation prompt), `alpaca` in the ### Instruction / ### Response template
that `finetune`'s alpaca format trains on.
"""
from __future__ import annotations

from typing import Literal

from lmforge.errors import UserError
from lmforge.tokens.chat import alpaca_template

Template = Literal["none", "chat", "alpaca"]
TEMPLATES = ("none", "chat", "alpaca")


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template (the template holds the special tokens)."""
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def prompt_ids(tok, prompt: str, template: Template = "none", inp: str = "") -> list[int]:
    """Token ids of `prompt` in `template`; `inp` is Alpaca's ### Input section (ignored by the other templates)."""
    if template == "chat":
        return chat_ids(tok, [{"role": "user", "content": prompt}])
    if template == "alpaca":
        return tok.encode(alpaca_template(prompt, inp))
    if template != "none":
        raise UserError(f"template {template!r}: expected one of {', '.join(TEMPLATES)}")
    return tok.encode(prompt)


def document_start(tok) -> list[int]:
    """What an empty prompt starts from: a fresh document after EOS, or after a newline for char-level models."""
    return [tok.eos_token_id] if tok.eos_token_id is not None else tok.encode("\n")


def eos_ids(model, tok) -> list[int]:
    """Every token that ends a sample: the generation config's EOS id(s) and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids
