"""Dedup's text and URL identities: normalised words (exact and near duplicates) and normalised URLs.

- Normalised text: NFKC, lowercased; every character that is not a letter, number or mark
  (Unicode categories L*, N*, M*) is a word boundary: punctuation (the underscore too), symbols,
  spaces, controls. Words are the runs between boundaries, joined by one space. So
  "Hello,  WORLD!" and "hello world" are exact duplicates.
- URL: scheme and fragment dropped, host lowercased without "www." and default port, `utm_*`,
  `fbclid`, `gclid` query parameters dropped and the rest sorted, trailing "/" dropped.
(A reference implementation in tests/test_dedup.py checks both.)
"""
from __future__ import annotations

import re
import unicodedata
from urllib.parse import parse_qsl, urlencode, urlsplit

# bytes.translate table: A-Z -> a-z, other ASCII non-alphanumerics -> space, bytes >= 0x80 (parts of
# UTF-8 sequences) unchanged
_ASCII_TABLE = bytes(c + 32 if 65 <= c <= 90 else c if c >= 128 or chr(c).isalnum() else 32 for c in range(256))


class _WordChars(dict):
    """str.translate table: letters, numbers and marks (Unicode L*, N*, M*) stay, all else -> space.
    Filled lazily, one entry per distinct character met."""

    def __missing__(self, cp: int) -> int:
        self[cp] = v = cp if unicodedata.category(chr(cp))[0] in "LNM" else 32
        return v


_WORD_CHARS = _WordChars()


def normalized_words(text: str) -> list[bytes]:
    """The words of the normalised text (module docstring), UTF-8 encoded."""
    if text.isascii():
        return text.encode("ascii").translate(_ASCII_TABLE).split()
    # ASCII boundaries with the byte table (fast); only words holding non-ASCII go through str.translate
    words = unicodedata.normalize("NFKC", text).lower().encode("utf-8").translate(_ASCII_TABLE).split()
    if all(w.isascii() for w in words):
        return words
    out: list[bytes] = []
    for w in words:
        out.extend(w.decode("utf-8").translate(_WORD_CHARS).encode("utf-8").split() if not w.isascii() else (w,))
    return out


def normalize_text(text: str) -> str:
    return b" ".join(normalized_words(text)).decode("utf-8")


_DROP_PARAMS = re.compile(r"^(utm_.*|fbclid|gclid)$", re.IGNORECASE)


def normalize_url(url: str) -> str:
    """A URL's identity for crawl dedup (module docstring); unparsable URLs are only stripped."""
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        port = parts.port
    except ValueError:
        return url.strip()
    if host.startswith("www."):
        host = host[4:]
    if port is not None and port not in (80, 443):
        host = f"{host}:{port}"
    query = urlencode(sorted((k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)
                             if not _DROP_PARAMS.match(k)))
    path = parts.path.rstrip("/")
    return f"{host}{path}" + (f"?{query}" if query else "")
