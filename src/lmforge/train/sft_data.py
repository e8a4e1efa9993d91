"""Supervised fine-tuning data: instruction, chat and text records -> examples with a loss mask -> batches.

Records come from .jsonl / .json / .parquet files (optionally compressed), a directory of them,
`hf:NAME[:SPLIT]` or a `save_to_disk` directory, streamed by `data.readers.iter_records` (a .json file
that is not one array is JSON lines). Each record becomes one `Example`: its token ids and
a mask of the tokens the model learns to produce (the response or assistant turns, and the EOS or
end-of-turn token that ends them). Bad records are skipped and counted with their file and line.

Batches are a pure function of (seed, step), like the pretraining windows, so a resumed run sees the
same batches. Without packing a micro-batch is one padding-free row: its examples back to back, kept
apart by position ids that restart at 0 (transformers turns those into a block-diagonal document mask
when the forward gets neither an attention mask nor a cache: pass use_cache=False). With packing,
examples fill rows of at most max_length tokens.
"""
from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, field_validator

from lmforge.config import Strict
from lmforge.data.readers import RECORD_FORMATS, ReadReport, is_hf_dataset, iter_records, split_suffix
from lmforge.errors import UserError
from lmforge.tokens.chat import alpaca_template

if TYPE_CHECKING:
    import torch

IGNORE = -100  # target of a position without loss (the cross-entropy ignore_index)
ROLES = ("system", "user", "assistant", "tool")
VAL_KEY = 2**32 - 1  # the validation permutation's rng key: one no epoch uses (epochs are keyed [seed, epoch])


def check_records_path(v: str) -> str:
    """A record file (.jsonl/.json/.parquet, maybe compressed), a directory, or an HF dataset spec."""
    p = Path(v)
    if is_hf_dataset(v) or p.is_dir():
        return v
    if not p.exists():
        raise ValueError(f"{v} does not exist (a .jsonl/.json/.parquet file, a directory, hf:NAME[:SPLIT] or a "
                         "save_to_disk directory)")
    if split_suffix(p)[0] not in RECORD_FORMATS:
        raise ValueError(f"{v}: not a .jsonl, .json or .parquet file (optionally .gz)")
    return v


def check_val_size(v: float) -> float:
    """val_size is a fraction below 1 or a whole count."""
    if v >= 1 and v != int(v):
        raise ValueError(f"val_size {v}: a fraction below 1 or a whole count of examples")
    return v


class SFTDataConfig(Strict):
    path: str = Field(description="a .jsonl/.json/.parquet file (.gz too), a directory of them, hf:NAME[:SPLIT] "
                                  "or a save_to_disk directory")
    # auto: from the first record's keys: messages -> chat, instruction or prompt -> alpaca, text -> text.
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    max_length: int = Field(512, gt=1, description="tokens per example; longer ones are truncated (and counted)")
    train_on_prompt: bool = Field(False, description="loss on prompt tokens too; default: response tokens only")
    packing: bool = Field(False, description="pack examples into padded rows of max_length; default: one "
                                             "padding-free row per micro-batch")
    val_size: float = Field(0.05, ge=0, description="<1: fraction of examples, >=1: a count; 0: no validation split")
    max_examples: int | None = Field(None, gt=0, description="use only the first N records (quick runs)")
    system_prompt: str | None = Field(None, description="chat: a system message for conversations that have none")
    chat_template: str | None = Field(None, description="Jinja template overriding the tokenizer's (default: its "
                                                        "own, else ChatML)")

    _path = field_validator("path")(check_records_path)
    _val_size = field_validator("val_size")(check_val_size)


@dataclass
class Example:
    input_ids: np.ndarray  # int32
    targets: np.ndarray  # bool, True where the token is one the model learns to produce
    difficulty: float | None = None  # the record's curriculum.field value, when a curriculum reads one

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SFTReport:
    """What loading made of the records: counts for data_report.json and one console line."""

    path: str
    format: str
    n_records: int = 0
    n_examples: int = 0
    n_train: int = 0
    n_val: int = 0
    truncated: int = 0
    n_tokens: int = 0
    n_target_tokens: int = 0
    skipped: ReadReport = field(default_factory=ReadReport)

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "skipped"}
        return {**d, "skipped": dict(self.skipped.skipped), "skip_examples": list(self.skipped.examples)}

    def summary(self) -> str:
        skipped = ", ".join(f"{k} {v}" for k, v in self.skipped.skipped.most_common()) or "none"
        return (f"sft data {self.path} ({self.format}): {self.n_records} records -> {self.n_examples} examples "
                f"({self.n_train} train, {self.n_val} val), {self.n_tokens:,d} tokens, {self.n_target_tokens:,d} "
                f"targets, {self.truncated} truncated; skipped: {skipped}")


@dataclass
class SFTData:
    train: list[Example]
    val: list[Example]
    report: SFTReport


class _Skip(Exception):
    """A record that cannot be used; the message is the reason it is counted under."""


# ---- rendering -----------------------------------------------------------------------------------

def detect_format(record: dict) -> str | None:
    """alpaca, chat or text from a record's keys; None when none fits."""
    keys = record.keys()
    if "messages" in keys:
        return "chat"
    if "instruction" in keys or "prompt" in keys:
        return "alpaca"
    return "text" if "text" in keys else None


def _string(record: dict, key: str) -> str:
    value = record.get(key)
    if value is None:
        raise _Skip(f"missing_{key}")
    if not isinstance(value, str):
        raise _Skip(f"non_string_{key}")
    if not value.strip():
        raise _Skip(f"empty_{key}")
    return value


def alpaca_prompt(record: dict) -> tuple[str, str]:
    """(prompt, response): the Alpaca template around instruction/input, or a raw prompt/completion pair."""
    if "instruction" not in record and "prompt" in record:
        return _string(record, "prompt"), _string(record, "completion")
    instruction, output, inp = _string(record, "instruction"), _string(record, "output"), record.get("input") or ""
    if not isinstance(inp, str):
        raise _Skip("non_string_input")
    return alpaca_template(instruction, inp), output


def chat_messages(record: dict, system_prompt: str | None) -> list[dict]:
    """The record's messages as {role, content}, checked, with `system_prompt` first when it has no system turn."""
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Skip("missing_messages" if messages is None else "bad_messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _Skip("bad_role")
        if not isinstance(m.get("content"), str):
            raise _Skip("non_string_content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise _Skip("no_assistant_turn")
    if system_prompt and not any(m["role"] == "system" for m in out):
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def render_chat(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as text, and the character span of each assistant turn (its end-of-turn token included).

    A turn's span runs from the end of the prefix rendered with a generation prompt to the end of the
    prefix that includes the turn, less trailing whitespace (the newline after ChatML's <|im_end|> is
    never generated, so it is not learned).
    """
    def render(ms: list[dict], gen: bool = False) -> str:
        try:
            return tokenizer.apply_chat_template(ms, tokenize=False, add_generation_prompt=gen)
        except Exception as e:  # noqa: BLE001 - templates raise what they like (raise_exception, KeyError, ...)
            raise _Skip("chat_template_error") from e

    text, spans = render(messages), []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            before, upto = render(messages[:i], True), render(messages[:i + 1])
            if not (upto.startswith(before) and text.startswith(upto)):
                raise _Skip("chat_template_not_incremental")
            spans.append((len(before), len(upto.rstrip())))
    return text, spans


# ---- tokenizing ----------------------------------------------------------------------------------

def encode_pairs(tokenizer, pairs: list[tuple[str, str]], train_on_prompt: bool) -> list[tuple[list, list]]:
    """(ids, target mask) per (prompt, response): prompt (with the tokenizer's BOS, if any), response, EOS."""
    eos = tokenizer.eos_token_id
    p_ids = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    r_ids = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return [(p + r + [eos], [train_on_prompt] * len(p) + [True] * (len(r) + 1)) for p, r in zip(p_ids, r_ids)]


def encode_chats(tokenizer, chats: list[tuple[str, list, bool]],
                 train_on_prompt: bool) -> list[tuple[list, np.ndarray]]:
    """(ids, target mask) per (text, assistant spans, ends with assistant): tokens overlapping a span are targets.

    EOS is appended as a target where the conversation ends with an assistant turn the template did not close with it.
    """
    eos, eos_tok = tokenizer.eos_token_id, tokenizer.eos_token
    # The template holds the special tokens; offsets map each token back to its characters.
    enc = tokenizer([c[0] for c in chats], add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for ids, offsets, (text, spans, last) in zip(enc["input_ids"], enc["offset_mapping"], chats):
        off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.full(len(ids), train_on_prompt)
        for start, end in spans:
            mask |= (off[:, 1] > start) & (off[:, 0] < end)
        if last and not text.rstrip().endswith(eos_tok):
            ids, mask = ids + [eos], np.append(mask, True)
        out.append((ids, mask))
    return out


def make_example(ids, mask, max_length: int) -> tuple[Example, bool]:
    """An Example cut to max_length, and whether it was cut; trailing tokens that precede no target are dropped."""
    mask = np.asarray(mask, dtype=bool)
    learned = np.flatnonzero(mask[1:])  # the first token is never predicted
    if not len(learned):
        raise _Skip("no_response_tokens")
    end = int(learned[-1]) + 2  # later tokens carry no loss and cannot affect earlier ones
    cut = end > max_length
    end = min(end, max_length)
    if not mask[1:end].any():
        raise _Skip("no_response_tokens_after_truncation")
    return Example(np.asarray(ids[:end], dtype=np.int32), mask[:end]), cut


def val_count(val_size: float, n: int) -> int:
    """Validation examples out of n: a fraction (at least one) below 1, else a count."""
    if val_size >= 1:
        return int(val_size)
    return max(1, round(val_size * n)) if val_size > 0 else 0


def load_sft_data(cfg: SFTDataConfig, tokenizer, seed: int, difficulty_field: str | None = None) -> SFTData:
    """Read, render and tokenize `cfg.path`, then split off a validation set deterministic in `seed`.

    `difficulty_field` (curriculum.field): each record's numeric value of it goes on its example; one without is an error.

    Chat data gives `tokenizer` a chat template first (cfg.chat_template, its own, else ChatML).
    """
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; SFT examples end with one so the model learns to stop")
    skipped = ReadReport()
    records = list(islice(iter_records(cfg.path, skipped, json_lines=True), cfg.max_examples))
    fmt = cfg.format
    if fmt == "auto":
        first = next((r for _, r in records if isinstance(r, dict)), None)
        fmt = detect_format(first) if first is not None else None
        if fmt is None:
            seen = sorted(first) if first is not None else "no JSON objects"
            raise UserError(f"{cfg.path}: no SFT format fits the first record's keys {seen}; expected messages "
                             "(chat), instruction+output or prompt+completion (alpaca), or text")
    if fmt == "chat":
        from lmforge.tokens.chat import ensure_chat_template

        ensure_chat_template(tokenizer, cfg.chat_template)
    wheres, parsed, difficulties = [], [], []
    for where, record in records:
        try:
            if not isinstance(record, dict):
                raise _Skip("not_an_object")
            if fmt == "alpaca":
                parsed.append(alpaca_prompt(record))
            elif fmt == "text":
                parsed.append(("", _string(record, "text")))
            else:
                messages = chat_messages(record, cfg.system_prompt)
                parsed.append((*render_chat(tokenizer, messages), messages[-1]["role"] == "assistant"))
            if difficulty_field is not None:
                value = record.get(difficulty_field)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UserError(f"{where}: curriculum.field {difficulty_field!r} is "
                                    f"{'missing' if value is None else 'not a number'} (keys: {sorted(record)})")
                difficulties.append(float(value))
            wheres.append(where)
        except _Skip as e:
            skipped.skip(str(e), where)
    encode = encode_chats if fmt == "chat" else encode_pairs
    encoded = encode(tokenizer, parsed, cfg.train_on_prompt) if parsed else []

    report = SFTReport(cfg.path, fmt, n_records=len(records), skipped=skipped)
    examples = []
    for k, (where, (ids, mask)) in enumerate(zip(wheres, encoded)):
        try:
            ex, cut = make_example(ids, mask, cfg.max_length)
        except _Skip as e:
            skipped.skip(str(e), where)
            continue
        ex.difficulty = difficulties[k] if difficulties else None
        examples.append(ex)
        report.truncated += cut
        report.n_tokens += len(ex)
        report.n_target_tokens += int(ex.targets[1:].sum())
    if not examples:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped.skipped.most_common(3)) or "no records"
        raise UserError(f"{cfg.path}: no usable SFT examples in {len(records)} records ({reasons}; first: "
                         f"{skipped.examples[0] if skipped.examples else 'none'})")
    n = len(examples)
    n_val = min(val_count(cfg.val_size, n), n - 1)  # at least one example is left to train on
    perm = np.random.default_rng([seed, VAL_KEY]).permutation(n)
    val_idx = set(perm[:n_val].tolist())
    report.n_examples, report.n_train, report.n_val = n, n - n_val, n_val
    return SFTData(train=[ex for i, ex in enumerate(examples) if i not in val_idx],
                   val=[ex for i, ex in enumerate(examples) if i in val_idx], report=report)


# ---- batching ------------------------------------------------------------------------------------

def pack(order: np.ndarray, lengths: np.ndarray, max_length: int) -> list[np.ndarray]:
    """Examples in `order` packed greedily, whole, into rows of at most max_length tokens."""
    rows, row, used = [], [], 0
    for i in order.tolist():
        if row and used + lengths[i] > max_length:
            rows.append(np.asarray(row))
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    if row:
        rows.append(np.asarray(row))
    return rows


def collate(examples: list[Example], rows: list[np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """A (B, L) batch, one row per entry of `rows` (example indices back to back), right-padded to the longest.

    targets[t] is the token at t + 1 where that token is a target, else -100 (so no target crosses from one
    example into the next); position_ids restart at 0 at every example and at the padding, which thus forms
    its own segment. `n_tokens` counts the non-padding tokens.
    """
    import torch  # here, so that configs (and `--help`) load without torch
    lengths = [sum(len(examples[i]) for i in row) for row in rows]
    shape = (len(rows), max(lengths))
    ids, tgt, pos = np.full(shape, pad_id, np.int64), np.full(shape, IGNORE, np.int64), np.zeros(shape, np.int64)
    for b, row in enumerate(rows):
        x = 0
        for i in row.tolist():
            ex = examples[i]
            n = len(ex)
            ids[b, x:x + n] = ex.input_ids
            tgt[b, x:x + n - 1] = np.where(ex.targets[1:], ex.input_ids[1:], IGNORE)
            pos[b, x:x + n] = np.arange(n)
            x += n
        pos[b, x:] = np.arange(shape[1] - x)
    return {"input_ids": torch.from_numpy(ids), "targets": torch.from_numpy(tgt), "position_ids": torch.from_numpy(pos),
            "n_tokens": torch.tensor(sum(lengths))}


def batch_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding input tokens in a batch (for tokens/s); its targets are `(batch["targets"] != -100).sum()`."""
    return int(batch["n_tokens"])


@dataclass
class TrainBatches:
    """(step, micro_bs, accum, rank, world) -> this rank's micro-batches of `step`, a pure function of (seed, step).

    Units are examples (padding-free) or packed rows. Epoch e orders the examples by
    default_rng([seed, e]).permutation; step s takes units s*G .. s*G+G-1 of the epochs laid end to end
    (G = micro_bs * accum * world), laid out like `train.data.micro_batches`: micro-batch m of rank r is
    units (m * world + r) * micro_bs onwards.
    """

    examples: list[Example]
    seed: int
    packing: bool
    max_length: int
    pad_id: int
    _units: dict = field(default_factory=dict, init=False, repr=False)  # the last two epochs' units
    _ends: list = field(default_factory=list, init=False, repr=False)  # cumulative unit count at the end of each epoch

    def epoch_units(self, epoch: int) -> list[np.ndarray]:
        """Epoch `epoch`'s units in order, each an array of example indices."""
        if epoch not in self._units:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            lengths = np.array([len(ex) for ex in self.examples])
            self._units[epoch] = pack(order, lengths, self.max_length) if self.packing else list(order[:, None])
            if len(self._units) > 2:
                del self._units[min(self._units)]
        return self._units[epoch]

    def unit(self, u: int) -> np.ndarray:
        """Global unit `u` (epochs laid end to end)."""
        while not self._ends or self._ends[-1] <= u:
            self._ends.append((self._ends[-1] if self._ends else 0) + len(self.epoch_units(len(self._ends))))
        epoch = bisect.bisect_right(self._ends, u)
        return self.epoch_units(epoch)[u - (self._ends[epoch - 1] if epoch else 0)]

    def __call__(self, step: int, micro_bs: int, accum: int, rank: int, world: int) -> list[dict[str, torch.Tensor]]:
        base, out = step * micro_bs * accum * world, []
        for m in range(accum):
            lo = base + (m * world + rank) * micro_bs
            units = [self.unit(u) for u in range(lo, lo + micro_bs)]
            out.append(collate(self.examples, units if self.packing else [np.concatenate(units)], self.pad_id))
        return out


def train_batches(data: SFTData, seed: int, packing: bool, max_length: int, pad_id: int) -> TrainBatches:
    """The engine's `train_batches` for `data.train`."""
    return TrainBatches(data.train, seed, packing, max_length, pad_id)


def eval_batches(data: SFTData, micro_bs: int, rank: int, world: int) -> Iterator[dict[str, torch.Tensor]]:
    """The validation examples in order, micro_bs per padding-free row; rank r takes batches r, r + world, ..."""
    starts = range(0, len(data.val), micro_bs)
    for lo in starts[rank::world]:
        yield collate(data.val, [np.arange(lo, min(lo + micro_bs, len(data.val)))], pad_id=0)  # one row: no padding
