"""Alignment data: preference pairs (reward, DPO, eval preference) and prompts (PPO, GRPO), tokenized and reported.

Preference records come in TRL's formats: `prompt`/`chosen`/`rejected` as strings or as chat messages,
or `chosen`/`rejected` alone whose shared prefix is the prompt (Anthropic HH-RLHF's
"\\n\\nHuman: ... \\n\\nAssistant: ..." dialogues, or message lists). With a chat template
(`template: auto` and the tokenizer has one, or `chat`) a pair is rendered as a conversation that ends
with the assistant's answer, as `finetune` renders chat data; `none` concatenates the raw strings
(TRL's "standard" format) with EOS after each answer. Prompt records have `prompt` (string or
messages), `question` (GSM8K) or an HH `chosen` dialogue; their other fields go to reward functions.
Bad records are skipped and counted with file:line; long pairs are truncated or dropped and counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from lmforge.config import Strict
from lmforge.data.readers import ReadReport, iter_records
from lmforge.errors import UserError
from lmforge.tokens.chat import ensure_chat_template
from lmforge.train.sft_data import check_records_path, check_val_size, val_count

VAL_KEY = 2**32 - 1  # the held-out split's rng key, apart from the epochs' [seed, epoch] keys
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


class Skip(Exception):
    """A record that cannot be used; the message is the reason it is counted under."""


class AlignDataConfig(Strict):
    path: str = Field(description="a .jsonl/.json/.parquet file (.gz too), a directory of them, hf:NAME[:SPLIT] "
                                  "or a save_to_disk directory")
    template: Literal["auto", "chat", "none"] = Field(
        "auto", description="auto: the tokenizer's chat template when it has one; chat: always (ChatML if none); "
                            "none: raw strings, EOS after each answer")
    max_length: int = Field(512, gt=1, description="prompt + answer tokens; longer pairs are truncated or dropped")
    max_prompt_length: int = Field(256, gt=0, description="prompts are cut to their last this many tokens")
    truncation: Literal["truncate", "drop"] = Field("truncate", description="what happens to a pair over max_length")
    val_size: float = Field(0.05, ge=0, description="<1: fraction held out, >=1: a count; 0: none")
    max_examples: int | None = Field(None, gt=0, description="use only the first N records")
    packing: bool = Field(True, description="a micro-batch's sequences share one padding-free row; false: one "
                                            "right-padded row each (less attention work when sequences are long)")
    system_prompt: str | None = Field(None, description="chat: a system message for conversations that have none")

    _path = field_validator("path")(check_records_path)
    _val_size = field_validator("val_size")(check_val_size)


@dataclass
class Pair:
    """One tokenized preference pair: the shared prompt and the two answers (EOS or end-of-turn included)."""
    prompt: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    margin: float | None = None

    @property
    def n_tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class Prompt:
    """One tokenized prompt for rollouts, and its record (reward functions read fields such as `answer`)."""
    ids: list[int]
    record: dict
    text: str = ""


@dataclass
class AlignReport:
    """What loading made of the records, for data_report.json and one console line."""
    path: str
    kind: str
    template: str
    n_records: int = 0
    n_examples: int = 0
    n_train: int = 0
    n_val: int = 0
    truncated: int = 0
    n_tokens: int = 0
    skipped: ReadReport = field(default_factory=ReadReport)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "skipped"}
        return {**d, "skipped": dict(self.skipped.skipped), "skip_examples": list(self.skipped.examples)}

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.skipped.most_common()) or "none"
        return (f"{self.kind} data {self.path} (template {self.template}): {self.n_records} records -> "
                f"{self.n_examples} ({self.n_train} train, {self.n_val} held out), {self.n_tokens:,d} tokens, "
                f"{self.truncated} truncated; skipped: {skipped}")


@dataclass
class AlignData:
    train: list
    val: list
    report: AlignReport


# ---- records -> text ---------------------------------------------------------------------------------

def _messages(value, key: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Skip(f"bad_{key}")
    out = []
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool") \
                or not isinstance(m.get("content"), str):
            raise Skip(f"bad_{key}_message")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise Skip(f"missing_{key}")
    if not isinstance(value, str):
        raise Skip(f"non_string_{key}")
    if not value.strip():
        raise Skip(f"empty_{key}")
    return value


def hh_messages(dialogue: str) -> list[dict] | None:
    """An HH-RLHF "\\n\\nHuman: ...\\n\\nAssistant: ..." dialogue as chat messages; None when it is not one."""
    parts = HH_TURN.split(dialogue)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c.strip()} for r, c in zip(parts[1::2], parts[2::2])]


def split_shared_prefix(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen answer, rejected answer) of an implicit-prompt pair: the prompt ends where they part,
    cut back to the last "Assistant:" marker before that point when there is one (HH-RLHF)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    cut = chosen.rfind("\n\nAssistant:", 0, n + 1)
    if cut >= 0:
        n = cut + len("\n\nAssistant:")
    return chosen[:n], chosen[n:], rejected[n:]


def preference_texts(record, use_chat: bool) -> tuple[list[dict] | str, list[dict] | str, list[dict] | str]:
    """(prompt, chosen, rejected) of a record: chat messages when `use_chat`, else strings."""
    if not isinstance(record, dict):
        raise Skip("not_an_object")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise Skip(f"missing_{key}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        prompt = record["prompt"]
        if isinstance(prompt, list):
            return (_messages(prompt, "prompt"), _messages(chosen, "chosen"), _messages(rejected, "rejected"))
        prompt, chosen, rejected = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
        if use_chat:
            return ([{"role": "user", "content": prompt}], [{"role": "assistant", "content": chosen}],
                    [{"role": "assistant", "content": rejected}])
        return prompt, chosen, rejected
    if isinstance(chosen, list):  # implicit prompt, conversational: the shared leading messages
        chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if use_chat:
        mc, mr = hh_messages(chosen), hh_messages(rejected)
        if mc and mr and mc[-1]["role"] == mr[-1]["role"] == "assistant" and mc[:-1] == mr[:-1]:
            return mc[:-1], mc[-1:], mr[-1:]
    return split_shared_prefix(chosen, rejected)


def prompt_text(record, use_chat: bool) -> list[dict] | str:
    """A prompt record's prompt: `prompt` (string or messages), `question`, or an HH `chosen` dialogue's context."""
    if not isinstance(record, dict):
        raise Skip("not_an_object")
    if isinstance(record.get("prompt"), list):
        return _messages(record["prompt"], "prompt")
    for key in ("prompt", "question"):
        if key in record:
            text = _text(record, key)
            return [{"role": "user", "content": text}] if use_chat else text
    if "chosen" in record:
        dialogue = _text(record, "chosen")
        messages = hh_messages(dialogue) if use_chat else None
        if messages and messages[-1]["role"] == "assistant":
            return messages[:-1]
        cut = dialogue.rfind("\n\nAssistant:")
        if cut < 0:
            raise Skip("no_assistant_turn")
        return dialogue[:cut + len("\n\nAssistant:")]
    raise Skip("missing_prompt")


# ---- text -> tokens ----------------------------------------------------------------------------------

class Renderer:
    """Turns prompts and answers (strings or messages) into token ids, with the chat template or without."""

    def __init__(self, tokenizer, template: str, system_prompt: str | None = None):
        self.tok = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat = template == "chat" or (template == "auto" and has_template)
        if self.use_chat:
            ensure_chat_template(tokenizer)
        self.system_prompt = system_prompt
        self.eos = tokenizer.eos_token_id

    def _with_system(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def _render(self, messages: list[dict], gen: bool) -> str:
        ensure_chat_template(self.tok)  # message records need a template even under `auto`: ChatML when none
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - templates raise what they like
            raise Skip("chat_template_error") from e

    def prompt(self, prompt: list[dict] | str) -> list[int]:
        if isinstance(prompt, str):
            return self.tok(prompt, add_special_tokens=True)["input_ids"]
        text = self._render(self._with_system(prompt), True)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def answer(self, prompt: list[dict] | str, answer: list[dict] | str) -> list[int]:
        """The answer's tokens as they follow the rendered prompt, ending with EOS or the end-of-turn token."""
        if isinstance(answer, str):
            ids = self.tok(answer, add_special_tokens=False)["input_ids"]
            return ids + [self.eos]
        messages = self._with_system(prompt)
        before, full = self._render(messages, True), self._render(messages + answer, False)
        if not full.startswith(before):
            raise Skip("chat_template_not_incremental")
        return self.tok(full[len(before):].rstrip(), add_special_tokens=False)["input_ids"]


def _tokenized(encode):
    """Run a tokenizing closure; a tokenizer that rejects the text (a word-level vocabulary without [UNK]) is a skip."""
    try:
        return encode()
    except Skip:
        raise
    except Exception as e:  # noqa: BLE001 - tokenizers raise plain Exception
        raise Skip("tokenizer_error") from e


def _fit(prompt: list[int], answers: list[list[int]], max_length: int, max_prompt: int, drop: bool
         ) -> tuple[list[int], list[list[int]], bool]:
    """Cut the prompt to its last max_prompt tokens, then each answer to the room left; (prompt, answers, cut)."""
    longest = max(len(prompt) + len(a) for a in answers)
    if longest <= max_length and len(prompt) <= max_prompt:
        return prompt, answers, False
    if drop:
        raise Skip("too_long")
    prompt = prompt[-max_prompt:]
    room = max_length - len(prompt)
    if room < 1:
        raise Skip("prompt_too_long")
    return prompt, [a[:room] for a in answers], True


def _read(cfg: AlignDataConfig) -> tuple[list, ReadReport]:
    skipped = ReadReport()
    return list(islice(iter_records(cfg.path, skipped, json_lines=True), cfg.max_examples)), skipped


def _split(items: list, val_size: float, seed: int) -> tuple[list, list]:
    n = len(items)
    n_val = min(val_count(val_size, n), n - 1)  # at least one item is left to train on
    held = set(np.random.default_rng([seed, VAL_KEY]).permutation(n)[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


def _no_examples(cfg: AlignDataConfig, kind: str, n: int, skipped: ReadReport, expected: str) -> UserError:
    reasons = ", ".join(f"{k} {v}" for k, v in skipped.skipped.most_common(3)) or "no records"
    first = skipped.examples[0] if skipped.examples else "none"
    return UserError(f"{cfg.path}: no usable {kind} in {n} records ({reasons}; first: {first}); expected {expected}")


PAIR_FORMATS = ("prompt/chosen/rejected (strings or chat messages), or chosen/rejected whose shared prefix is "
                "the prompt (HH-RLHF)")


def check_preference_file(cfg: AlignDataConfig) -> None:
    """Fail fast, before any model loads, when the first record is not a preference pair."""
    records, _ = _read(cfg.model_copy(update={"max_examples": 1}))
    first = next((r for _, r in records if isinstance(r, dict)), None)
    if first is None or "chosen" not in first or "rejected" not in first:
        keys = sorted(first) if first is not None else "no JSON objects"
        raise UserError(f"{cfg.path}: the first record has keys {keys}; a preference file needs {PAIR_FORMATS}")


def load_pairs(cfg: AlignDataConfig, tokenizer, seed: int, split: bool = True) -> AlignData:
    """Read, render and tokenize preference pairs; identical and malformed pairs are skipped and counted."""
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; each answer ends with one")
    records, skipped = _read(cfg)
    r = Renderer(tokenizer, cfg.template, cfg.system_prompt)
    report = AlignReport(cfg.path, "preference", "chat" if r.use_chat else "none", n_records=len(records),
                         skipped=skipped)
    pairs = []
    for where, record in records:
        try:
            prompt, chosen, rejected = preference_texts(record, r.use_chat)
            if chosen == rejected:
                raise Skip("identical_pair")
            p_ids, c_ids, j_ids = _tokenized(lambda: (r.prompt(prompt), r.answer(prompt, chosen),
                                                      r.answer(prompt, rejected)))
            if not p_ids:
                raise Skip("empty_prompt")
            if c_ids == j_ids:
                raise Skip("identical_pair")
            p_ids, (c_ids, j_ids), cut = _fit(p_ids, [c_ids, j_ids], cfg.max_length, cfg.max_prompt_length,
                                              cfg.truncation == "drop")
            if c_ids == j_ids:
                raise Skip("identical_after_truncation")
            margin = record.get("margin")
            if margin is not None and not isinstance(margin, (int, float)):
                raise Skip("non_number_margin")
        except Skip as e:
            skipped.skip(str(e), where)
            continue
        pair = Pair(np.asarray(p_ids, np.int32), np.asarray(c_ids, np.int32), np.asarray(j_ids, np.int32),
                    None if margin is None else float(margin))
        pairs.append(pair)
        report.truncated += cut
        report.n_tokens += pair.n_tokens
    if not pairs:
        raise _no_examples(cfg, "preference pairs", len(records), skipped, PAIR_FORMATS)
    train, val = _split(pairs, cfg.val_size, seed) if split else (pairs, [])
    report.n_examples, report.n_train, report.n_val = len(pairs), len(train), len(val)
    return AlignData(train, val, report)


def load_prompts(cfg: AlignDataConfig, tokenizer, seed: int) -> AlignData:
    """Read and tokenize rollout prompts (prompts over max_prompt_length keep their last tokens, counted)."""
    records, skipped = _read(cfg)
    r = Renderer(tokenizer, cfg.template, cfg.system_prompt)
    report = AlignReport(cfg.path, "prompt", "chat" if r.use_chat else "none", n_records=len(records), skipped=skipped)
    prompts = []
    for where, record in records:
        try:
            text = prompt_text(record, r.use_chat)
            ids = _tokenized(lambda: r.prompt(text))
            if not ids:
                raise Skip("empty_prompt")
        except Skip as e:
            skipped.skip(str(e), where)
            continue
        if len(ids) > cfg.max_prompt_length:
            ids = ids[-cfg.max_prompt_length:]
            report.truncated += 1
        shown = text if isinstance(text, str) else text[-1]["content"]
        prompts.append(Prompt(ids, record, shown))
        report.n_tokens += len(ids)
    if not prompts:
        raise _no_examples(cfg, "prompts", len(records), skipped, "prompt (string or messages), question, or an "
                                                                  "HH chosen dialogue")
    train, val = _split(prompts, cfg.val_size, seed)
    report.n_examples, report.n_train, report.n_val = len(prompts), len(train), len(val)
    return AlignData(train, val, report)
