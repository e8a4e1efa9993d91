"""`lmforge eval perplexity`: rolling-window perplexity scored the way lm-eval's `loglikelihood_rolling` does.

Each document is tokenized without special tokens and cut into windows of at most `max_length`
tokens: the first is predicted from a prefix token (BOS, else EOS: lm-eval's `prefix_token_id`),
each later one from the tokens before it, and every token is predicted exactly once
(`get_rolling_token_windows` + `make_disjoint_window` in lm_eval/utils.py). `stride` is how many
tokens each window predicts; the default, `max_length`, is lm-eval's `context_len=1`, and a smaller
stride gives every prediction more left context. Word perplexity, byte perplexity and bits per byte
use lm-eval's definitions: words = len(re.split(r"\\s+", doc)), bytes = len(doc.encode("utf-8")).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError


@dataclass
class PerplexityResult:
    documents: int
    tokens: int
    words: int
    bytes: int
    loglikelihood: float
    token_perplexity: float
    word_perplexity: float
    byte_perplexity: float
    bits_per_byte: float


def rolling_windows(tokens: list[int], prefix: int, max_length: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) pairs that predict every token once, each input at most max_length tokens."""
    if not tokens:
        return []
    windows = [([prefix], tokens[: min(max_length, len(tokens))])]
    done = len(windows[0][1])
    while done < len(tokens):
        n = min(len(tokens) - done, stride)
        end = done + n
        context = tokens[max(0, end - max_length - 1): end - 1]
        windows.append((context[: len(context) - (n - 1)], tokens[end - n: end]))
        done = end
    return windows


def read_documents(path: str | Path) -> list[str]:
    """Documents from a .txt file (the whole file is one document), .jsonl (`text` per line) or .json (a list)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file")
    if path.suffix not in (".txt", ".jsonl", ".json"):
        raise UserError(f"--data {path}: use .txt, .jsonl (a `text` field per line) or .json")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".txt":
        return [raw]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                record = _json(line, f"{path}:{i}")
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f"{path}:{i}: expected an object with a string `text`")
                docs.append(record["text"])
        return docs
    data = _json(raw, str(path))
    if not isinstance(data, list) or not all(isinstance(d, str) or (isinstance(d, dict) and isinstance(
            d.get("text"), str)) for d in data):
        raise UserError(f"{path}: expected a JSON list of strings or of objects with a string `text`")
    return [d if isinstance(d, str) else d["text"] for d in data]


def _json(text: str, where: str):
    """json.loads, with a UserError naming `where` for text that is not JSON (the user's file)."""
    try:
        return json.loads(text)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None


def score(model, documents: list[str], stride: int | None = None) -> PerplexityResult:
    """Sum every document's token log-likelihood over its rolling windows; `model` is an EvalModel whose
    max_length is the window (the windows of all documents are scored together, in length-sorted batches)."""
    max_length = model.max_length
    stride = stride or max_length
    if max_length < 1:
        raise UserError(f"--max-length must be at least 1, got {max_length}")
    if not 1 <= stride <= max_length:
        raise UserError(f"--stride must be between 1 and --max-length ({max_length}), got {stride}")
    scored = model.loglikelihood_rolling(documents, stride)
    total, n_tokens = sum(ll for ll, _ in scored), sum(n for _, n in scored)
    if not n_tokens:
        raise UserError("the documents hold no tokens to score")
    words = sum(len(re.split(r"\s+", d)) for d in documents)
    n_bytes = sum(len(d.encode("utf-8")) for d in documents)
    return PerplexityResult(
        documents=len(documents), tokens=n_tokens, words=words, bytes=n_bytes, loglikelihood=total,
        token_perplexity=math.exp(-total / n_tokens), word_perplexity=math.exp(-total / words),
        byte_perplexity=math.exp(-total / n_bytes), bits_per_byte=-total / n_bytes / math.log(2))
