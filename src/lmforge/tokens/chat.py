"""Prompt templates: chat templates (the tokenizer's own, or ChatML for tokenizers that ship none) and Alpaca's."""
from __future__ import annotations

# ChatML (the format SmolLM2, Qwen and many others use), with a {% generation %} block so that
# transformers can return an assistant-token mask. The end-of-turn marker is the tokenizer's EOS,
# so a model fine-tuned on it learns to stop.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer, template: str | None = None):
    """Give `tokenizer` a chat template: `template` if given, else its own, else ChatML; returns it."""
    if template:
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


# Alpaca's prompt (Stanford alpaca's train.py), the variant with an ### Input section and the one without.
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def alpaca_template(instruction: str, inp: str = "") -> str:
    """The Alpaca prompt, up to and including `### Response:\n` (the variant with ### Input when `inp` is set)."""
    if inp.strip():
        return ALPACA_INPUT.format(instruction=instruction, input=inp)
    return ALPACA.format(instruction=instruction)
