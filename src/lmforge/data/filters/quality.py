"""Document-level quality rules: the guide's heuristics, Gopher quality, FineWeb's extra rules.

Each filter is a config model (defaults = the published thresholds) and a `make_*` function that
turns it into `reject(doc) -> reason | None`. A threshold set to None switches its rule off.
Unless a rule says otherwise, a value exactly at a threshold passes (datatrove's `>`/`<`).

Speed: these run over millions of documents, so every count is a regex `findall`/`sub`, a
`str` method or a `map` over tokens; nothing loops over characters in Python.
"""
from __future__ import annotations

from itertools import filterfalse
from typing import Callable

from pydantic import Field

from lmforge.config import Strict
from lmforge.data.base import Document
from lmforge.data.filters.text import (DATATROVE_PUNCTUATION, DATATROVE_TERMINALS, TOKEN_OR_EMPTY_RE, TOKEN_RE,
                                       alpha_re, find_duplicates, letter_count)

Reject = Callable[[Document], "str | None"]


class FilterConfig(Strict):
    """Options every filter takes."""

    name: str | None = Field(None, description="step name in stats and reports (default: the filter's name)")


class Rebuildable:
    """`make(cfg)` as a callable that pickles: closures (and a loaded language model) do not, so a
    pickled copy carries the config and the module-level `make`, and rebuilds in the worker."""

    def __init__(self, make: Callable, cfg: FilterConfig):
        self.make, self.cfg = make, cfg
        self._fn = make(cfg)

    def __call__(self, *args):
        return self._fn(*args)

    def __getstate__(self):
        return {"make": self.make, "cfg": self.cfg}

    def __setstate__(self, state):
        self.__init__(state["make"], state["cfg"])


# ---------------------------------------------------------------- the guide's heuristics


class HeuristicConfig(FilterConfig):
    """Cheap whole-document heuristics. Words are whitespace-separated (`str.split`)."""

    min_words: int | None = Field(50, description="fewer words -> heuristic_few_words")
    max_words: int | None = Field(100_000, description="more words -> heuristic_many_words")
    min_mean_word_length: float | None = Field(3.0, description="mean chars per word below -> heuristic_short_words")
    max_mean_word_length: float | None = Field(10.0, description="mean chars per word above -> heuristic_long_words")
    min_alpha_ratio: float | None = Field(
        0.8, description="letters / non-whitespace chars below -> heuristic_low_alpha (English prose ~0.95, "
        "tables of numbers and code fall below 0.8)")
    min_unique_trigram_ratio: float | None = Field(
        0.5, description="distinct / all lowercased word trigrams below -> heuristic_repeated_trigrams "
        "(prose > 0.9; a 100k-word book ~0.75; boilerplate and spam loops < 0.5)")


def make_heuristic(cfg: HeuristicConfig) -> Reject:
    min_words, max_words = cfg.min_words, cfg.max_words
    min_len, max_len = cfg.min_mean_word_length, cfg.max_mean_word_length
    min_alpha, min_trigram = cfg.min_alpha_ratio, cfg.min_unique_trigram_ratio

    def reject(doc: Document) -> str | None:
        text = doc.text
        ws = text.split()
        n = len(ws)
        if (min_words is not None and n < min_words) or n == 0:
            return "heuristic_few_words"
        if max_words is not None and n > max_words:
            return "heuristic_many_words"
        n_chars = len("".join(ws))  # non-whitespace characters
        mean = n_chars / n
        if min_len is not None and mean < min_len:
            return "heuristic_short_words"
        if max_len is not None and mean > max_len:
            return "heuristic_long_words"
        if min_alpha is not None and letter_count(text) / n_chars < min_alpha:
            return "heuristic_low_alpha"
        if min_trigram is not None and n >= 3:
            lw = text.lower().split()
            if len(set(zip(lw, lw[1:], lw[2:]))) / (n - 2) < min_trigram:
                return "heuristic_repeated_trigrams"
        return None

    return reject


# ---------------------------------------------------------------- Gopher quality

GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
BULLETS = ("•", "-")  # datatrove's; add others (‣ ◦ ▪ *) with the `bullets` option


class GopherQualityConfig(FilterConfig):
    """Gopher's quality rules (Rae et al. 2021, appendix A1) with datatrove's GopherQualityFilter thresholds.

    Tokens are `text.TOKEN_RE`'s; a token made only of datatrove's punctuation characters is a symbol,
    every other token (words, numbers, "©", "€", emoji) a "non-symbol word". Symbols count in the ratios'
    denominators, as in datatrove's GopherQualityFilter, which this equals given the same tokens.
    """

    min_words: int | None = Field(50, description="fewer non-symbol words -> gopher_short_doc")
    max_words: int | None = Field(100_000, description="more non-symbol words -> gopher_long_doc")
    min_avg_word_length: float | None = Field(3, description="-> gopher_below_avg_threshold")
    max_avg_word_length: float | None = Field(10, description="-> gopher_above_avg_threshold")
    max_symbol_word_ratio: float | None = Field(
        0.1, description="'#' per token, and ('...' + '…') per token, above -> gopher_too_many_hashes / _ellipsis")
    max_bullet_lines_ratio: float | None = Field(0.9, description="lines starting with a bullet -> gopher_too_many_bullets")
    max_ellipsis_lines_ratio: float | None = Field(
        0.3, description="lines ending with '...' or '…' -> gopher_too_many_end_ellipsis")
    min_alpha_words_ratio: float | None = Field(
        0.8, description="tokens with an alphabetic char (str.isalpha) below -> gopher_below_alpha_threshold")
    min_stop_words: int | None = Field(2, description="fewer distinct stop words present -> gopher_few_stop_words")
    stop_words: list[str] = Field(list(GOPHER_STOP_WORDS), description="case-sensitive, as in datatrove")
    bullets: list[str] = Field(list(BULLETS), description="a line whose stripped text starts with one of these is a "
                               "bullet line (datatrove's • and -)")


def make_gopher_quality(cfg: GopherQualityConfig) -> Reject:
    min_words, max_words = cfg.min_words, cfg.max_words
    min_avg, max_avg = cfg.min_avg_word_length, cfg.max_avg_word_length
    max_sym, max_bullet, max_ell = cfg.max_symbol_word_ratio, cfg.max_bullet_lines_ratio, cfg.max_ellipsis_lines_ratio
    min_alpha, min_stop = cfg.min_alpha_words_ratio, cfg.min_stop_words
    stop_words = frozenset(cfg.stop_words)
    bullets = tuple(cfg.bullets)
    find_tokens, has_alpha = TOKEN_OR_EMPTY_RE.findall, alpha_re().search

    def reject(doc: Document) -> str | None:
        text = doc.text
        tokens = find_tokens(text)  # symbol tokens come back as ""
        words = list(filter(None, tokens))  # the "non-symbol words"
        if "１" in text:  # the one word character that is also a datatrove symbol: "１" alone is a symbol
            words = [w for w in words if not DATATROVE_PUNCTUATION.issuperset(w)]
        n_words = len(words)
        if (min_words is not None and n_words < min_words) or n_words == 0:
            return "gopher_short_doc"
        if max_words is not None and n_words > max_words:
            return "gopher_long_doc"
        avg = sum(map(len, words)) / n_words
        if min_avg is not None and avg < min_avg:
            return "gopher_below_avg_threshold"
        if max_avg is not None and avg > max_avg:
            return "gopher_above_avg_threshold"
        n_tokens = len(tokens)
        if max_sym is not None:
            if text.count("#") / n_tokens > max_sym:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_tokens > max_sym:
                return "gopher_too_many_ellipsis"
        if max_bullet is not None or max_ell is not None:
            lines = text.splitlines()
            n_lines = len(lines)
            if max_bullet is not None and sum(1 for s in lines if s.lstrip().startswith(bullets)) / n_lines > max_bullet:
                return "gopher_too_many_bullets"
            if max_ell is not None and sum(1 for s in lines if s.rstrip().endswith(("...", "…"))) / n_lines > max_ell:
                return "gopher_too_many_end_ellipsis"
        if min_alpha is not None:
            # symbol tokens never hold a letter, so only words need checking; all-letter words (most) at C speed
            mixed = list(filterfalse(str.isalpha, words))
            if (n_words - list(map(has_alpha, mixed)).count(None)) / n_tokens < min_alpha:
                return "gopher_below_alpha_threshold"
        if min_stop is not None and len(stop_words.intersection(words)) < min_stop:
            return "gopher_few_stop_words"
        return None

    return reject


# ---------------------------------------------------------------- FineWeb


class FineWebConfig(FilterConfig):
    """FineWeb's own rules (Penedo et al. 2024), as datatrove 0.10's FineWebQualityFilter checks them.

    Lines are the non-empty lines of `text.split("\\n")` (not stripped); a document without one is
    dropped (fineweb_empty). A ratio beyond its threshold drops the document; at it passes.
    """

    line_punct_thr: float | None = Field(
        0.12, description="fraction of lines ending in a sentence terminal below -> fineweb_line_punct_ratio")
    line_punct_exclude_zero: bool = Field(False, description="keep documents with no punctuated line at all")
    stop_chars: str | None = Field(
        None, description="characters that end a punctuated line (default: datatrove's TERMINAL_PUNCTUATION, "
        ". ! ? 。 ... in every script)")
    short_line_length: int = Field(30, description="a line of at most this many chars is short")
    short_line_thr: float | None = Field(0.67, description="fraction of short lines above -> fineweb_short_line_ratio")
    char_duplicates_ratio: float | None = Field(
        0.1, description="chars in repeated lines / chars (newlines excluded) above -> fineweb_char_dup_ratio "
        "(the FineWeb paper's 0.1; datatrove's class default is 0.01)")
    new_line_ratio: float | None = Field(0.3, description="newlines per token above -> fineweb_list_ratio")


def make_fineweb(cfg: FineWebConfig) -> Reject:
    punct_thr, exclude_zero = cfg.line_punct_thr, cfg.line_punct_exclude_zero
    short_len, short_thr = cfg.short_line_length, cfg.short_line_thr
    dup_thr, nl_thr = cfg.char_duplicates_ratio, cfg.new_line_ratio
    terminal = DATATROVE_TERMINALS if cfg.stop_chars is None else frozenset(cfg.stop_chars)
    find_tokens = TOKEN_RE.findall

    def reject(doc: Document) -> str | None:
        text = doc.text
        lines = [s for s in text.split("\n") if s.strip()]
        n_lines = len(lines)
        if n_lines == 0:
            return "fineweb_empty"
        if punct_thr is not None:
            ratio = sum(1 for s in lines if s[-1] in terminal) / n_lines
            if ratio < punct_thr and not (ratio == 0 and exclude_zero):
                return "fineweb_line_punct_ratio"
        if short_thr is not None and sum(1 for s in lines if len(s) <= short_len) / n_lines > short_thr:
            return "fineweb_short_line_ratio"
        if dup_thr is not None and find_duplicates(lines)[1] / (len(text) - text.count("\n")) > dup_thr:
            return "fineweb_char_dup_ratio"
        if nl_thr is not None and text.count("\n") / len(find_tokens(text)) > nl_thr:
            return "fineweb_list_ratio"
        return None

    return reject
