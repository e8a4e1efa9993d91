"""C4's cleaning rules (Raffel et al. 2020), line by line as tfds' c4_utils and datatrove's C4QualityFilter apply them.

C4 edits documents (it removes lines), so it is a map step, `c4_clean(doc, stats) -> Document | None`.
Each line is stripped, then, in this order:
  1. a word longer than `max_word_length` chars           -> line removed (c4_line_too_long_word)
  2. Wikipedia citation marks ([1], [edit], [citation needed]) are deleted from the line
  3. not ending in . ? ! " ' or ending in "..."            -> line removed (c4_line_no_terminal_punct)
  4. fewer than `min_words_per_line` words                -> line removed (c4_line_too_few_words)
  5. "lorem ipsum" (any case)                              -> document dropped (c4_lorem_ipsum)
  6. "javascript" (any case)                               -> line removed (c4_line_javascript)
  7. a curly bracket "{"                                   -> document dropped (c4_curly_bracket)
  8. a cookie / terms-of-use / privacy-policy phrase       -> line removed (c4_line_policy)
As in C4, rules 5 and 7 look only at lines that survived rules 1-4. The kept lines are joined with
newlines; fewer than `min_num_sentences` sentences in them drops the document (c4_too_few_sentences).

Sentences are counted per kept line as datatrove counts them (spaCy's English tokenizer and its
rule-based sentencizer), by one regex instead of spaCy: a line is one sentence plus one per boundary,
and a boundary is a sentence-final mark that spaCy would make a token of its own (! ? 。 ...; a "."
after a digit, a lower-case letter or two capitals, not in an abbreviation such as Mr., e.g. or Jan.,
nor a run of dots) with a token after it on the line that is no punctuation. It gives spaCy's count
on every line of tests/test_filters_datatrove.py's corpus, and needs no spaCy.
The bad-words list rule is not applied (it needs the LDNOOBW list, a download).
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import replace
from typing import Callable

from pydantic import Field

from lmforge.data.base import Document, StepStats
from lmforge.data.filters.quality import FilterConfig

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
# spaCy's English tokenizer exceptions that end in "." (its "." is then no token of its own, so no boundary):
# the literal ones, then times (10a.m.), single lower-case letters (a. b.) and temperatures (°C.).
_ABBREVIATIONS = (
    "Adm. Ak. Ala. Apr. Ariz. Ark. Aug. Bros. Calif. Co. Colo. Conn. Corp. D.C. Dec. Del. Dr. E.G. E.g. Feb. Fla. "
    "Ga. Gen. Gov. I.E. I.e. Ia. Id. Ill. Inc. Ind. Jan. Jr. Jul. Jun. Kan. Kans. Ky. La. Ltd. Mar. Mass. Md. "
    "Messrs. Mich. Minn. Miss. Mo. Mont. Mr. Mrs. Ms. Mt. N.C. N.D. N.H. N.J. N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. "
    "Okla. Ore. Pa. Ph.D. Prof. Rep. Rev. S.C. Sen. Sep. Sept. St. Tenn. Va. Wash. Wis. a.m. co. e.g. i.e. p.m. "
    "v.s. vs.").split()
_OPEN, _CLOSE = "([{\"'“‘«", ")]}\"'”’»"
_QUOTES = "\"'`´‘’‚“”„«»「」『』"
_LOWER = "a-zß-öø-ÿ\u03ac-\u03ce\u0430-\u045f"  # spaCy splits "." after these (Latin, Greek, Cyrillic lower case)
_AFTER = _OPEN + _CLOSE + _QUOTES + "%²+-…,:;!?¿¡<>_#*&·。？！，、；：～।،۔؛٪"  # and after quotes, brackets, spaCy's PUNCT
_TERMINALS = "!?\u061f\u06d4\u0964\u3002\uff01\uff1f"  # its sentencizer's marks that its tokenizer splits off
# Punctuation as spaCy's is_punct sees it (Unicode category P*), in the scripts and blocks a line of English
# meets; a token of anything else ($, ©, a word) after a mark makes the boundary.
_PUNCT = re.escape("".join(c for c in map(chr, [*range(0x3100), *range(0xFE10, 0xFF70)])
                           if unicodedata.category(c).startswith("P")))


def _not_after(words: list[str]) -> str:
    """Lookbehinds (just past a ".") that fail when the "." ends one of `words` standing at a chunk's start,
    after at most one opening quote or bracket (spaCy keeps such a word whole). Grouped by length, as
    Python's lookbehinds are fixed-width."""
    out = []
    for n in sorted({len(w) for w in words}):
        alt = "|".join(re.escape(w) for w in words if len(w) == n)
        out.append(rf"(?<!(?<!\S)(?:{alt}))(?<!(?<!\S)[{re.escape(_OPEN)}](?:{alt}))")
    return "".join(out)


# The places where spaCy makes a sentence mark a token of its own; a boundary is one of three named groups:
#   infix   a "." between a lower-case letter and a capital (csv.QUOTE_ALL), spaCy's infix rule;
#   prefix  ! ? ... opening a chunk (after at most two opening quotes or brackets), before a token that is
#           no punctuation (?a);
#   space   a mark ending a chunk: "." after a digit, a lower-case letter, a quote, a bracket or one of
#           spaCy's punctuation marks, after two capitals or a space, never in a run of dots nor ending
#           an abbreviation; or ! ? ... — with the punctuation after it and then a space.
# Every alternative starts with a mark character (the scan skips the rest of a line fast) and takes a run
# of marks whole, so a line of 100,000 "!" is one match: the scan stays linear.
_Q, _O = re.escape(_QUOTES), re.escape(_OPEN)
SENTENCE_MARK_RE = re.compile(
    rf"(?P<infix>\.(?<=[{_LOWER}{_Q}]\.)(?=[A-Z{_Q}]))"
    rf"|(?P<prefix>[{_TERMINALS}](?:(?<=(?<!\S).)|(?<=(?<!\S)[{_O}].)|(?<=(?<!\S)[{_O}][{_O}].)))"
    rf"(?=[{_PUNCT}]*[^\s{_PUNCT}])"
    r"|(?P<mark>\.(?!\.)(?<!\.\.)"
    rf"(?:(?<=[0-9{_LOWER}{re.escape(_AFTER)}]\.)|(?<=[A-Z][A-Z]\.)|(?<=°[CFKcfk]\.)|(?<!\S\.))"
    + _not_after(_ABBREVIATIONS + [f"{h}{m}.m." for h in range(1, 13) for m in "ap"]
                 + [f"{c}." for c in "abcdefghijklmnopqrstuvwxyzäöü"] + [f"°{t}." for t in "CFKcfk"])
    + rf"|[{_TERMINALS}])"
    r"(?=(?P<tail>[^\w\s]*))(?P=tail)(?P<space>\s?)")
LAST_NON_PUNCT_RE = re.compile(rf"[^\s{_PUNCT}](?=[\s{_PUNCT}]*$)")


def count_sentences(line: str) -> int:
    """Sentences in one line, as spaCy's sentencizer (datatrove's C4 counter) finds them; see the module doc."""
    last = LAST_NON_PUNCT_RE.search(line)  # boundaries need a token after them that is no punctuation
    if last is None:
        return 1
    return 1 + sum(1 for m in SENTENCE_MARK_RE.finditer(line, 0, last.start())
                   if m.group("space") or m.group("infix") or m.group("prefix"))


POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


class C4Config(FilterConfig):
    remove_citations: bool = Field(True, description="delete [1], [edit], [citation needed] from lines")
    filter_no_terminal_punct: bool = Field(True, description="remove lines not ending in . ? ! \" ' (or ending in ...)")
    min_num_sentences: int | None = Field(5, description="fewer sentences left -> c4_too_few_sentences")
    min_words_per_line: int | None = Field(3, description="remove lines with fewer whitespace-separated words")
    max_word_length: int | None = Field(1000, description="remove lines holding a longer word")
    filter_lorem_ipsum: bool = Field(True, description="drop documents with 'lorem ipsum' -> c4_lorem_ipsum")
    filter_javascript: bool = Field(True, description="remove lines mentioning 'javascript'")
    filter_curly_bracket: bool = Field(True, description="drop documents with '{' -> c4_curly_bracket")
    filter_policy: bool = Field(True, description="remove cookie / terms-of-use / privacy-policy lines")


def make_c4_clean(cfg: C4Config) -> Callable[[Document, StepStats], Document | None]:
    cites, punct, min_sent = cfg.remove_citations, cfg.filter_no_terminal_punct, cfg.min_num_sentences
    min_words, max_len = cfg.min_words_per_line, cfg.max_word_length
    lorem, js, curly, policy = cfg.filter_lorem_ipsum, cfg.filter_javascript, cfg.filter_curly_bracket, cfg.filter_policy
    strip_cites = CITATION_RE.sub

    def c4_clean(doc: Document, stats: StepStats) -> Document | None:
        counts: Counter = Counter()
        kept: list[str] = []
        n_sentences = 0
        reason = None
        for line in doc.text.splitlines():
            line = line.strip()
            counts["c4_line_total"] += 1
            words = line.split()
            if max_len is not None and len(line) > max_len and max(map(len, words)) > max_len:
                counts["c4_line_too_long_word"] += 1
                continue
            if cites:
                line = strip_cites("", line)
            if punct and (not line.endswith(END_PUNCTUATION) or line.endswith("...")):
                counts["c4_line_no_terminal_punct"] += 1
                continue
            if min_words is not None and len(words) < min_words:
                counts["c4_line_too_few_words"] += 1
                continue
            lower = line.lower()
            if lorem and "lorem ipsum" in lower:
                reason = "c4_lorem_ipsum"
                break
            if js and "javascript" in lower:
                counts["c4_line_javascript"] += 1
                continue
            if curly and "{" in line:
                reason = "c4_curly_bracket"
                break
            if policy and any(p in lower for p in POLICY_SUBSTRINGS):
                counts["c4_line_policy"] += 1
                continue
            n_sentences += count_sentences(line)
            kept.append(line)
        if reason is None and min_sent is not None and n_sentences < min_sent:
            reason = "c4_too_few_sentences"
        stats.counters.update(counts)
        if reason is not None:
            stats.drop(reason, doc.id)
            return None
        stats.counters["c4_line_kept"] += len(kept)
        return replace(doc, text="\n".join(kept).strip())

    return c4_clean


c4_clean = make_c4_clean(C4Config())  # C4's defaults; build others with make_c4_clean(C4Config(...))
