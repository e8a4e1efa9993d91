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
Sentences are counted by a regex (terminal punctuation followed by a space or the line's end; at
least one per kept line) instead of nltk's punkt, which needs a download.
The bad-words list rule is not applied (it needs the LDNOOBW list, a download).
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import replace
from typing import Callable

from pydantic import Field

from lmforge.data.base import Document, StepStats
from lmforge.data.filters.quality import FilterConfig

CITATION_RE = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
SENTENCE_END_RE = re.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")
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
    strip_cites, count_sentences = CITATION_RE.sub, SENTENCE_END_RE.findall

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
            n_sentences += max(1, len(count_sentences(line)))
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
