"""Gopher's repetition rules (Rae et al. 2021, table A1), computed as datatrove's GopherRepetitionFilter does.

- paragraphs (split on 2+ newlines) and lines (split on 1+ newlines): the fraction of items that
  repeat an earlier item, and their characters as a fraction of the document's characters;
- top n-grams (n = 2, 3, 4): characters of the most frequent n-gram (words joined by one space)
  times its count, over the document's characters;
- duplicated n-grams (n = 5..10): walking left to right, an n-gram seen before adds its
  characters (words joined without spaces) and the walk jumps n words; otherwise it is remembered
  and the walk moves one word. Over the document's characters.

Words are `text.TOKEN_RE` tokens (punctuation marks included, like datatrove's word tokenizers).
One difference from datatrove stays, on purpose: n-grams are compared word by word, where datatrove
keys a duplicated n-gram by its words joined without spaces (so "ab c" repeats "a bc" there).

Speed: n-grams are tuples built by `zip` (C), n-gram lengths come from prefix sums, the top
n-gram from a `Counter`, and the left-to-right walk runs only when some 5-gram repeats at all —
without a repeated n-gram no longer n-gram repeats either, so most documents skip it.
"""
from __future__ import annotations

from collections import Counter
from itertools import accumulate
from typing import Iterator

from pydantic import Field

from lmforge.data.base import Document
from lmforge.data.filters.quality import FilterConfig, Reject
from lmforge.data.filters.text import LINE_SPLIT_RE, PARAGRAPH_SPLIT_RE, TOKEN_RE, find_duplicates


class GopherRepetitionConfig(FilterConfig):
    """Thresholds are maxima: a fraction above one drops the document (at it passes)."""

    dup_para_frac: float | None = Field(0.3, description="-> gopher_dup_para_frac")
    dup_para_char_frac: float | None = Field(0.2, description="-> gopher_dup_para_char_frac")
    dup_line_frac: float | None = Field(0.3, description="-> gopher_dup_line_frac")
    dup_line_char_frac: float | None = Field(0.2, description="-> gopher_dup_line_char_frac")
    top_n_grams: dict[int, float] = Field({2: 0.2, 3: 0.18, 4: 0.16}, description="n -> max fraction; -> gopher_top_N_gram")
    dup_n_grams: dict[int, float] = Field(
        {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}, description="n -> max fraction; -> gopher_dup_N_grams")


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters of the most frequent n-gram (joined by single spaces) times its count; the first
    seen wins a tie, as with `Counter.most_common`. 0 when there are fewer than n words."""
    top = Counter(zip(*(words[i:] for i in range(n)))).most_common(1)
    if not top:
        return 0
    gram, count = top[0]
    return (sum(map(len, gram)) + n - 1) * count


def duplicate_ngram_chars(words: list[str], ns: list[int]) -> Iterator[tuple[int, int]]:
    """For each n in `ns` (ascending): (n, characters of the n-grams that repeat an earlier one).

    datatrove's walk: left to right, an n-gram already seen adds its characters (words joined
    without spaces) and the walk jumps n words, so overlapping repeats count once; otherwise the
    n-gram is remembered and the walk moves one word. Stops early once no n-gram repeats (every
    larger n then gives 0, which is not yielded).

    Only positions whose n-gram occurs more than once can ever be "seen before"; a walk over just
    those positions gives the same sum (the others only move the walk one word). And an n-gram
    that repeats starts with an (n-1)-gram that repeats, so each n's candidates are found among
    the previous n's.
    """
    prefix = None
    cand: list[int] | None = None  # None: every position
    grams: list[tuple[str, ...]] = []
    for n in ns:
        m = len(words) - n + 1
        if m <= 1:
            return
        if cand is None:
            grams = list(zip(*(words[i:] for i in range(n))))
            counts = Counter(grams)
            if len(counts) == m:
                return
            cand = [i for i, g in enumerate(grams) if counts[g] > 1]
            grams = [grams[i] for i in cand]
        else:
            grams = [tuple(words[i:i + n]) for i in cand if i < m]
            counts = Counter(grams)
            pairs = [(i, g) for i, g in zip(cand, grams) if counts[g] > 1]
            if not pairs:
                return
            cand, grams = [i for i, _ in pairs], [g for _, g in pairs]
        if prefix is None:
            prefix = list(accumulate(map(len, words), initial=0))
        seen: set = set()
        repeated = idx = 0
        for p, g in zip(cand, grams):
            if p < idx:
                continue
            if g in seen:
                repeated += prefix[p + n] - prefix[p]
                idx = p + n
            else:
                seen.add(g)
                idx = p + 1
        yield n, repeated


def make_gopher_repetition(cfg: GopherRepetitionConfig) -> Reject:
    para_frac, para_char = cfg.dup_para_frac, cfg.dup_para_char_frac
    line_frac, line_char = cfg.dup_line_frac, cfg.dup_line_char_frac
    top = sorted(cfg.top_n_grams.items())
    dup = dict(cfg.dup_n_grams)
    dup_ns = sorted(dup)
    split_para, split_lines, find_tokens = PARAGRAPH_SPLIT_RE.split, LINE_SPLIT_RE.split, TOKEN_RE.findall

    def reject(doc: Document) -> str | None:
        text = doc.text
        n_chars = len(text)
        if not text:  # only "": whitespace goes through the rules, as in datatrove ("\n\n" repeats a line)
            return "gopher_empty_doc"
        if para_frac is not None or para_char is not None:
            paras = split_para(text.strip())
            n_dup, dup_chars = find_duplicates(paras)
            if para_frac is not None and n_dup / len(paras) > para_frac:
                return "gopher_dup_para_frac"
            if para_char is not None and dup_chars / n_chars > para_char:
                return "gopher_dup_para_char_frac"
        if line_frac is not None or line_char is not None:
            lines = split_lines(text)
            n_dup, dup_chars = find_duplicates(lines)
            if line_frac is not None and n_dup / len(lines) > line_frac:
                return "gopher_dup_line_frac"
            if line_char is not None and dup_chars / n_chars > line_char:
                return "gopher_dup_line_char_frac"
        words = find_tokens(text)
        for n, frac in top:
            if top_ngram_chars(words, n) / n_chars > frac:
                return f"gopher_top_{n}_gram"
        for n, chars in duplicate_ngram_chars(words, dup_ns):
            if chars / n_chars > dup[n]:
                return f"gopher_dup_{n}_grams"
        return None

    return reject
