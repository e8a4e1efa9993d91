"""Chat templates: the tokenizer's own, or ChatML for tokenizers that ship none."""
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
