"""The quality filters against datatrove's own GopherQuality, GopherRepetition, FineWebQuality and C4Quality
filters (the reference) on the same documents: the same keep/drop decisions and the same reasons.

datatrove comes with the bench extra, which `make test` does not install, so this module skips without it
(a plain skip, also under CI). Its English word tokenizer is spaCy's; lmforge's is a regex that splits prose
the same way (text.py). So the rules are compared twice: given the same tokens (lmforge's, handed to
datatrove), where they must agree on every document; and with datatrove's own spaCy tokenizer (needs
spaCy), where they must agree on every document both tokenize alike, and C4 (which counts sentences, not
words) on every document."""
from __future__ import annotations

import importlib
import inspect
import pydoc
import random

import pytest

from lmforge.data.base import Document, StepStats
from lmforge.data.filters import FILTERS
from lmforge.data.filters.c4 import count_sentences
from lmforge.data.filters.repetition import duplicate_ngram_chars, top_ngram_chars
from lmforge.data.filters.text import tokens
from test_filters import FRENCH, GERMAN, PROSE, W3, words3

pytest.importorskip("datatrove", reason="datatrove is the bench extra's (pip install datatrove), not make test's")
from datatrove.data import Document as DatatroveDocument  # noqa: E402
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,  # noqa: E402
                                        GopherRepetitionFilter)
from datatrove.utils.word_tokenizers import WordTokenizer  # noqa: E402


class LmforgeTokens(WordTokenizer):
    """lmforge's tokens as a datatrove word tokenizer, so the two filters see the same words."""

    def word_tokenize(self, text: str) -> list[str]:
        return tokens(text)

    def sent_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("the word filters compared here never split sentences")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        raise NotImplementedError("the word filters compared here never split sentences")


# ------------------------------------------------------------------ the documents

def _rule_lines(rng: random.Random, prose: list[str]) -> str:
    """One line of a kind that feeds one rule or another: bullets, ellipses, hashes, numbers, short menu
    lines, repeats, symbols, abbreviations, policy and javascript lines, citations, code."""
    p = rng.choice(prose)
    kind = rng.choice(["prose", "bullet", "ellipsis", "hash", "numbers", "short", "blank", "js", "lorem", "curly",
                       "policy", "cite", "long_word", "terminal", "nonsense", "stop_words", "caps", "code",
                       "symbols", "abbreviations"])
    return {
        "prose": p,
        "bullet": rng.choice(["- ", "• ", "* ", "  - ", "‣ ", "◦ "]) + p,
        "ellipsis": p.rstrip(".") + rng.choice(["...", "…", " ...", "....", "…."]),
        "hash": " ".join(rng.choice(["#tag", "#", "##", p.split()[0]]) for _ in range(rng.randint(1, 8))),
        "numbers": " ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(rng.randint(1, 10))),
        "short": rng.choice(["Home", "Menu", "Read more.", "Contact us", "Next »", "OK!", "Yes?"]),
        "blank": rng.choice(["", "  "]),
        "js": p[:-1] + " and enable JavaScript now.",
        "lorem": "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
        "curly": p[:-1] + " with {braces}.",
        "policy": rng.choice(["We use cookies to improve the site.", "Read our privacy policy and terms of use."]),
        "cite": p[:-1] + rng.choice(["[1].", ".[2]", " [edit]", "[citation needed]."]),
        "long_word": "See " + "x" * rng.choice([999, 1000, 1001]) + " here.",
        "terminal": p[:-1] + rng.choice(["。", "!", "?", "︕", "៖", "؟", "'", '"', ")"]),
        "nonsense": " ".join(rng.sample(W3, rng.randint(3, 15))),
        "stop_words": " ".join(rng.choice(["the", "The", "and", "of", "to", "with", "that", "have", "be"])
                               for _ in range(rng.randint(1, 6))),
        "caps": p.upper(),
        "code": rng.choice(["x = f(a, b)", "for i in range(10):", "    return x + 1", "if a == b: pass"]),
        "symbols": " ".join(rng.choice(["©", "€", "→", "•", "½", "m²", "“x”", "‘y’", "😀", "¿Qué?", "１", "１２",
                                        "Ⅷ", "™", "§", "°"]) for _ in range(rng.randint(1, 6))),
        "abbreviations": rng.choice(["Mr. Smith met Dr. Jones at St. Mary's Church.", "Prices rose 5%. Costs fell.",
                                     "It was 5 p.m. on Jan. 3 in the U.S. when it began.",
                                     "Use tools, e.g. hammers, i.e. the usual ones.", "The C.E.O. said no. Then he left.",
                                     "It hit 350°F. Then 60F. Done.", "He said \"no.\" Then left. (See below.) Done."]),
    }[kind]


def generated(n: int, seed: int = 0) -> list[str]:
    """Documents of 1-40 lines drawn from `_rule_lines` with random weights, so each leans to a few rules and
    many land near a threshold; joined by newlines, blank lines or spaces."""
    rng = random.Random(seed)
    prose = PROSE.splitlines()
    docs = []
    for _ in range(n):
        lines: list[str] = []
        for _ in range(rng.randint(1, 40)):
            # a repeat of the line before, now and then: the repetition rules' food
            lines.append(lines[-1] if lines and rng.random() < 0.15 else _rule_lines(rng, prose))
        docs.append(rng.choice(["\n", "\n", "\n\n", " "]).join(lines))
    return docs


def real_text() -> list[str]:
    """Text from the standard library (on every machine): pydoc's text pages, docstrings and source files."""
    docs = []
    for name in ["json", "csv", "argparse", "textwrap", "string", "heapq", "bisect", "email", "logging", "random"]:
        module = importlib.import_module(name)
        docs += [pydoc.render_doc(module, renderer=pydoc.plaintext), inspect.getsource(module)[:5000],
                 inspect.getdoc(module) or ""]
    for name in ["os", "re", "itertools", "functools", "pathlib", "subprocess"]:
        module = importlib.import_module(name)
        docs += [d for d in (inspect.getdoc(getattr(module, a)) or "" for a in sorted(dir(module))[:30]) if len(d) > 100]
    return docs


def fixtures() -> list[str]:
    """test_filters' documents, edge cases (empty, whitespace only) and threshold-crossing constructions."""
    lines = [" ".join(words3(60)[i:i + 6]) for i in range(0, 60, 6)]
    return [PROSE, FRENCH, GERMAN, "", " ", "\n\n", "a", PROSE + "\n" + PROSE, "\n\n".join([PROSE] * 2),
            " ".join(words3(50)), " ".join(words3(49)), " ".join(words3(90)[:-1] + ["#"] * 11), " ".join(words3(90)[:-1] + ["…"] * 11),
            "\n".join("  • " + s for s in lines), "\n".join([s + " …" for s in lines[:4]] + lines[4:]),
            " ".join(words3(79) + [str(100 + i) for i in range(21)]), " ".join(["the"] * 5 + W3[:60])]


CORPUS = fixtures() + real_text() + generated(250)

# datatrove's reason -> lmforge's
REASONS = {
    "gopher_quality": lambda r: {"gopher_enough_stop_words": "gopher_few_stop_words"}.get(r, r),
    "gopher_repetition": lambda r: "gopher_" + {"empty": "empty_doc"}.get(r, r).replace("duplicated_", "dup_")
                                   .replace("_n_grams", "_grams"),
    "fineweb": lambda r: "fineweb_" + r,
    "c4": lambda r: "c4_" + r,
}


def verdicts(name: str, datatrove_filter, options: dict, docs: list[str]) -> tuple[list, list]:
    """(datatrove's, lmforge's) verdict per document: (reason in lmforge's names or None, text kept or None)."""
    step = FILTERS[name](options)
    theirs, ours = [], []
    for i, text in enumerate(docs):
        d = DatatroveDocument(text=text, id=str(i))
        res = datatrove_filter.filter(d)
        theirs.append((None, d.text) if res is True else (REASONS[name](res[1]), None))
        if name == "c4":
            stats = StepStats("c4")
            out = step.fn(Document(id=str(i), text=text), stats)
            ours.append((None, out.text) if out else (next(iter(stats.drops)), None))
        else:
            reason = step.reject(Document(id=str(i), text=text))
            ours.append((reason, text if reason is None else None))
    return theirs, ours


def disagreements(theirs: list, ours: list, docs: list[str], only: list[int] | None = None) -> list:
    idx = range(len(docs)) if only is None else only
    return [(i, theirs[i][0], ours[i][0], docs[i][:80]) for i in idx if theirs[i] != ours[i]]


# ------------------------------------------------------------------ given the same tokens

GOPHER_CUSTOM = (
    dict(min_doc_words=20, max_doc_words=400, min_avg_word_length=4, max_avg_word_length=8, max_symbol_word_ratio=0.05,
         max_bullet_lines_ratio=0.5, max_ellipsis_lines_ratio=0.1, max_non_alpha_words_ratio=0.9, min_stop_words=1,
         stop_words=["the", "a"]),
    dict(min_words=20, max_words=400, min_avg_word_length=4, max_avg_word_length=8, max_symbol_word_ratio=0.05,
         max_bullet_lines_ratio=0.5, max_ellipsis_lines_ratio=0.1, min_alpha_words_ratio=0.9, min_stop_words=1,
         stop_words=["the", "a"]))
REPETITION_CUSTOM = (
    dict(dup_line_frac=0.1, dup_para_frac=0.1, dup_line_char_frac=0.05, dup_para_char_frac=0.05,
         top_n_grams=((2, 0.1), (3, 0.08)), dup_n_grams=((5, 0.05), (7, 0.04))),
    dict(dup_line_frac=0.1, dup_para_frac=0.1, dup_line_char_frac=0.05, dup_para_char_frac=0.05,
         top_n_grams={2: 0.1, 3: 0.08}, dup_n_grams={5: 0.05, 7: 0.04}))
FINEWEB_CUSTOM = (
    dict(line_punct_thr=0.5, line_punct_exclude_zero=True, short_line_thr=0.3, short_line_length=40,
         char_duplicates_ratio=0.05, new_line_ratio=0.1, stop_chars=(".", "!")),
    dict(line_punct_thr=0.5, line_punct_exclude_zero=True, short_line_thr=0.3, short_line_length=40,
         char_duplicates_ratio=0.05, new_line_ratio=0.1, stop_chars=".!"))

# Every rule's reason that the corpus must reach with the default settings (so agreement is not agreement
# on keeping everything).
MUST_REACH = {
    "gopher_quality": {None, "gopher_short_doc", "gopher_below_avg_threshold", "gopher_above_avg_threshold",
                       "gopher_too_many_hashes", "gopher_too_many_ellipsis", "gopher_too_many_bullets",
                       "gopher_too_many_end_ellipsis", "gopher_below_alpha_threshold", "gopher_few_stop_words"},
    "gopher_repetition": {None, "gopher_empty_doc", "gopher_dup_para_frac", "gopher_dup_line_frac",
                          "gopher_dup_line_char_frac", "gopher_top_2_gram", "gopher_dup_5_grams"},
    "fineweb": {None, "fineweb_empty", "fineweb_line_punct_ratio", "fineweb_short_line_ratio",
                "fineweb_char_dup_ratio", "fineweb_list_ratio"},
}


@pytest.mark.parametrize("name, make, theirs, ours", [
    ("gopher_quality", GopherQualityFilter, {}, {}),
    ("gopher_quality", GopherQualityFilter, *GOPHER_CUSTOM),
    ("gopher_repetition", GopherRepetitionFilter, {}, {}),
    ("gopher_repetition", GopherRepetitionFilter, *REPETITION_CUSTOM),
    ("fineweb", FineWebQualityFilter, {"char_duplicates_ratio": 0.1}, {}),  # lmforge's default: the paper's 0.1
    ("fineweb", FineWebQualityFilter, {}, {"char_duplicates_ratio": 0.01}),  # datatrove's class default
    ("fineweb", FineWebQualityFilter, *FINEWEB_CUSTOM),
], ids=["gopher_quality", "gopher_quality-custom", "gopher_repetition", "gopher_repetition-custom",
        "fineweb-0.1", "fineweb-0.01", "fineweb-custom"])
def test_rules_equal_datatroves_given_the_same_tokens(name, make, theirs, ours):
    """Every document, every setting: the same decision and reason once both see lmforge's tokens."""
    dt_verdicts, lm_verdicts = verdicts(name, make(**theirs, language=LmforgeTokens("en")), ours, CORPUS)
    assert disagreements(dt_verdicts, lm_verdicts, CORPUS) == []
    if not theirs and not ours:
        assert MUST_REACH[name] <= {v[0] for v in dt_verdicts}


def test_fast_ngram_counts_equal_datatroves_functions():
    """repetition.py's n-gram counts against datatrove's own find_top_duplicate / find_all_duplicate."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate, find_top_duplicate, get_n_grams

    rng = random.Random(0)
    # words of one repeated letter each: joined without spaces (as datatrove joins them) they still parse one way
    for _ in range(400):
        vocab = ["a", "bb", "ccc", "dd", "e", "ffff"][: rng.randint(1, 6)]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 50))]
        got = dict(duplicate_ngram_chars(words, [5, 6, 7, 8, 9, 10]))
        assert [got.get(n, 0) for n in range(5, 11)] == [find_all_duplicate(words, n) for n in range(5, 11)], words
        tops = [find_top_duplicate(get_n_grams(words, n)) if len(words) >= n else 0 for n in (2, 3, 4)]
        assert [top_ngram_chars(words, n) for n in (2, 3, 4)] == tops, words


def test_known_difference_datatrove_joins_ngram_words_without_spaces():
    """datatrove keys a duplicated n-gram by its words joined with no space, so "ab c" repeats "a bc"; lmforge
    compares the words themselves (Gopher's word n-grams). Written down here so a change on either side shows."""
    from datatrove.pipeline.filters.gopher_repetition_filter import find_all_duplicate

    words = W3[:10] + ["ab", "c", "d", "e", "f"] + W3[10:20] + ["a", "bc", "d", "e", "f"] + W3[20:30]
    assert find_all_duplicate(words, 5) == len("abcdef")
    assert dict(duplicate_ngram_chars(words, [5])) == {}


# ------------------------------------------------------------------ with datatrove's own tokenizer (spaCy)

@pytest.fixture(scope="module")
def spacy_words():
    """datatrove's English word tokenizer (spaCy's, blank: no model download), or a skip without spaCy."""
    pytest.importorskip("spacy", reason="datatrove's English word tokenizer is spaCy's (pip install spacy)")
    from datatrove.utils.text import split_into_words

    return split_into_words


@pytest.mark.parametrize("name, make, theirs", [
    ("gopher_quality", GopherQualityFilter, {}),
    ("gopher_repetition", GopherRepetitionFilter, {}),
    ("fineweb", FineWebQualityFilter, {"char_duplicates_ratio": 0.1}),
])
def test_filters_equal_datatroves_where_spacy_tokenizes_alike(spacy_words, name, make, theirs):
    """datatrove as it ships: the same verdict on every document whose spaCy tokens are lmforge's tokens (the
    others differ on code, URLs, brackets inside words and abbreviations such as Mr.; see text.py)."""
    alike = [i for i, text in enumerate(CORPUS) if spacy_words(text) == tokens(text)]
    assert len(alike) >= 100  # the fixtures, most prose, and the generated documents without code or symbols
    dt_verdicts, lm_verdicts = verdicts(name, make(**theirs), {}, CORPUS)
    assert disagreements(dt_verdicts, lm_verdicts, CORPUS, only=alike) == []


def test_c4_equals_datatroves_with_spacys_sentences(spacy_words):
    """C4 counts sentences, not words: the same verdict and the same cleaned text on every document."""
    dt_verdicts, lm_verdicts = verdicts("c4", C4QualityFilter(), {}, CORPUS)
    assert disagreements(dt_verdicts, lm_verdicts, CORPUS) == []
    reached = {v[0] for v in dt_verdicts}
    assert {None, "c4_lorem_ipsum", "c4_curly_bracket", "c4_too_few_sentences"} <= reached


def test_sentence_counts_equal_spacys_sentencizer(spacy_words):
    """count_sentences against datatrove's split_into_sentences (spaCy's sentencizer) on every line C4 counts
    (three words or more, ending in . ? ! " ' but not ...)."""
    from datatrove.utils.text import split_into_sentences

    lines = {line.strip() for text in CORPUS for line in text.splitlines()}
    lines = {line for line in lines if len(line.split()) >= 3 and line.endswith((".", "?", "!", '"', "'"))
             and not line.endswith("...")}
    wrong = [(line[:80], len(split_into_sentences(line)), count_sentences(line)) for line in sorted(lines)
             if len(split_into_sentences(line)) != count_sentences(line)]
    assert len(lines) > 500 and wrong == []
