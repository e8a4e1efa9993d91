"""Text pieces the filters share: a word tokenizer, line/paragraph splitters, duplicate counting.

The word tokenizer is a regex, not nltk or spaCy: it runs in C over the whole text, needs no
model or download, and splits English prose as datatrove's spaCy tokenizer does — words and
numbers are tokens, punctuation marks are tokens of their own (`...` and `--` are one), hyphens
split words, clitics are words ('s, n't). It differs from spaCy mostly on code and URLs, which
spaCy keeps in larger pieces (`Decimal('1` is one spaCy token, four here).
"""
from __future__ import annotations

import functools
import re
import sys

_CLITIC = r"(?:s|re|ve|ll|d|m|t|S|RE|VE|LL|D|M|T)"
# A word, split the way spaCy's English tokenizer splits prose: letters and digits, joined across
# inner '.', '_' and apostrophes (3.14, example.com, base_dir, O'Brien) and digits across ',' and
# '/' (100,000, 1/2); initials and abbreviations keep their dots (A., e.g., U.S.); English clitics
# are words of their own (it 's, we 're; don 't where spaCy says do n't: same count and characters,
# and no lazy scan for "n't", which cost a third of the tokenizer's time); hyphens and
# leading/trailing '_' are punctuation (well - known, _ _ init _ _).
_WORD = (r"[^\W\d_]\.(?:[^\W\d_]\.)+|[^\W\d_]\.(?![^\W_])"
         rf"|['’]{_CLITIC}\b"
         rf"|[^\W_]+(?:(?:[._]|(?<=\d)[,/](?=\d)|['’](?!{_CLITIC}\b))[^\W_]+)*")
_PUNCT = r"\.\.\.|--+|\S"  # an ellipsis, a dash run, or any other single non-space character
WORD_RE = re.compile(_WORD)
# Every token: a word or a punctuation token.
TOKEN_RE = re.compile(rf"{_WORD}|{_PUNCT}")
NON_LETTERS_RE = re.compile(r"[\W\d_]+")
# Characters with Unicode's Sentence_Terminal property (. ! ? 。 । ؟ ...), as regex's
# \p{Sentence_Terminal} lists them: what ends a sentence in any script.
SENTENCE_TERMINALS = frozenset(
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u1803\u1809\u1944\u1945\u1aa8\u1aa9"
    "\u1aaa\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c\u1c7e\u1c7f\u2024"
    "\u203c\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u2e60\u2e61\u3002\ua4ff"
    "\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1"
    "\uabeb\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55"
    "\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047"
    "\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5"
    "\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9"
    "\U000113d4\U000113d5\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb"
    "\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4"
    "\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944"
    "\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8"
    "\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016d6e"
    "\U00016d6f\U00016e98\U0001bc9f\U0001da88"
)
# datatrove 0.10's TERMINAL_PUNCTUATION, the line ends FineWeb's filter accepts: an older Unicode's
# Sentence_Terminal (without the 16 terminals newer Unicode added, in Balinese, Coptic, Tulu-Tigalari,
# Kirat Rai, and the vertical forms ︒ ︕ ︖) plus three Khmer signs.
DATATROVE_TERMINALS = (SENTENCE_TERMINALS | frozenset("\u17d6\u17d9\u17da")) - frozenset(
    "\u1b4e\u1b4f\u1b7f\u2024\u2cf9\u2cfa\u2cfb\u2e60\u2e61\ufe12\ufe15\ufe16"
    "\U000113d4\U000113d5\U00016d6e\U00016d6f")
# datatrove 0.10's PUNCTUATION_SET (its PUNCTUATION string, the C0/C1 control characters and the terminals
# above): a token made only of these is a "symbol" for the Gopher quality rules; any other token is a word
# ("©", "€", "•" and emoji are words there, as in datatrove).
DATATROVE_PUNCTUATION = frozenset(
    "!/\u2014\u201d:\uff05\uff11\u3008&(\u3001\u2501\\\u3010#%\u300c\u300d\uff0c\u3011\uff1b+^]~\u201c\u300a"
    "\u201e';\u2019{|\u2236\xb4[=-`*\uff0e\uff08\u2013\uff1f\uff01\uff1a$\uff5e\xab\u3009,><\u300b)?\uff09\u3002"
    "\u2026@_.\"}\u25ba\xbb"
) | frozenset(map(chr, [*range(0, 9), *range(11, 32), *range(127, 160)])) | DATATROVE_TERMINALS
# The same tokens as TOKEN_RE, but a symbol token (only DATATROVE_PUNCTUATION characters) comes back as
# "" (findall returns the group): one pass gives both the token count and, through filter(None, ...), the
# Gopher rules' "non-symbol words". The one word character among those symbols, the fullwidth digit "１",
# still makes a word here: a token of nothing but "１" and joiners is datatrove's symbol, checked apart.
_SYMBOLS = "".join(sorted(DATATROVE_PUNCTUATION))
TOKEN_OR_EMPTY_RE = re.compile(rf"({_WORD}|[^\s{re.escape(_SYMBOLS)}])|{_PUNCT}")
PARAGRAPH_SPLIT_RE = re.compile(r"\n{2,}")
LINE_SPLIT_RE = re.compile(r"\n+")


def words(text: str) -> list[str]:
    """The words of `text` (punctuation left out)."""
    return WORD_RE.findall(text)


def tokens(text: str) -> list[str]:
    """The words and punctuation tokens of `text`, in order."""
    return TOKEN_RE.findall(text)


def find_duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, their total characters).

    The first occurrence of each distinct item is not a duplicate; every later one is. Written
    with sets (C speed) instead of a per-item loop: duplicates = all - distinct.
    """
    distinct = set(items)
    if len(distinct) == len(items):
        return 0, 0
    return len(items) - len(distinct), sum(map(len, items)) - sum(map(len, distinct))


@functools.cache
def alpha_re() -> re.Pattern:
    """One character for which str.isalpha() is true.

    `[^\\W\\d_]` also takes the ~1,100 numerals that are alphanumeric but not letters (² ½ Ⅷ); they are
    listed from this Python's own Unicode tables once per process (~0.1 s), so the two always agree."""
    numerals = "".join(c for c in map(chr, range(sys.maxunicode + 1))
                       if c.isalnum() and not c.isalpha() and not c.isdecimal())
    return re.compile(rf"[^\W\d_{re.escape(numerals)}]")


def letter_count(text: str) -> int:
    """How many alphabetic characters `text` has (any script)."""
    return len(NON_LETTERS_RE.sub("", text))
