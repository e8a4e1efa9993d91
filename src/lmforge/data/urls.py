"""URLs and addresses for the crawler: normalisation, domain checks, SSRF guard, links.

Kept apart from crawl.py because each piece is a pure function with its own tests.
"""
from __future__ import annotations

import ipaddress
import string
from typing import Iterable
from urllib.parse import urljoin, urlsplit, urlunsplit

# ----------------------------------------------------------------------------------------------- URLs

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_SAFE = frozenset(_SUB_DELIMS + ":@/")
_QUERY_SAFE = frozenset(_SUB_DELIMS + ":@/?")
_HEX = frozenset(string.hexdigits)
DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalize_percent(s: str, safe: frozenset) -> str:
    """Decode %XX of unreserved characters, upper-case the other escapes, encode what must be encoded."""
    out, i = [], 0
    while i < len(s):
        ch = s[i]
        if ch == "%" and i + 2 < len(s) and s[i + 1] in _HEX and s[i + 2] in _HEX:
            c = chr(int(s[i + 1:i + 3], 16))
            out.append(c if c in _UNRESERVED else "%" + s[i + 1:i + 3].upper())
            i += 3
            continue
        if ch in _UNRESERVED or ch in safe:
            out.append(ch)
        else:  # '%' without two hex digits, space, quotes, non-ASCII, ...: UTF-8 percent-encoded
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    segments = path.split("/")
    kept: list[str] = []
    for seg in segments:
        if seg == "..":
            if len(kept) > 1:
                kept.pop()
        elif seg != ".":
            kept.append(seg)
    if segments[-1] in (".", ".."):
        kept.append("")
    out = "/".join(kept)
    return out if out.startswith("/") else "/" + out


def normalize_url(url: str, base: str | None = None) -> str:
    """The one spelling of an http(s) URL under which it is fetched, seen and stored.

    Resolves `url` against `base`; lower-cases scheme and host (IDNA for non-ASCII hosts, no
    trailing dot); drops user info, the default port, the fragment and an empty query ('?');
    removes dot segments; percent-encoding: unreserved characters decoded, other escapes upper-
    cased, unsafe characters encoded as UTF-8. Query parameters keep their order: reordering can
    merge distinct resources and would make us request URLs no page links to; pages that differ
    only in parameter order are left to the dedup step. Raises ValueError (non-http(s) scheme,
    no host, bad port).
    """
    url = "".join(ch for ch in url.strip() if ch not in "\t\r\n")
    if base is not None:
        url = urljoin(base, url)
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"unsupported scheme {scheme or '(none)'!r}")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise ValueError("no host")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"bad host name {host!r}") from e
    port = parts.port  # ValueError for a port out of range or not a number
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    path = _remove_dot_segments(_normalize_percent(parts.path, _PATH_SAFE) or "/")
    query = _normalize_percent(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


def in_domains(host: str, domains: Iterable[str]) -> bool:
    """`host` equals one of `domains` or is a subdomain of one."""
    return any(host == d or host.endswith("." + d) for d in domains)


# ------------------------------------------------------------------------------------------ SSRF guard

def allowed_networks(allow_private) -> list | None:
    """None: every private address allowed; else the list of networks exempt from the SSRF guard."""
    if allow_private is True:
        return None
    if not allow_private:
        return []
    return [ipaddress.ip_network(n, strict=False) for n in allow_private]


def address_refusal(ip: str, allow_private: bool | Iterable[str] = False) -> str | None:
    """Why a request to `ip` is refused ("multicast", "private", ...), or None when it may be made."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    inner = getattr(addr, "ipv4_mapped", None) or getattr(addr, "sixtofour", None)
    if inner is not None:  # ::ffff:127.0.0.1 and 2002:7f00:1:: are 127.0.0.1
        addr = inner
    if addr.is_multicast:
        return "multicast"
    if addr.is_unspecified:
        return "unspecified"
    if addr.is_loopback or addr.is_link_local or addr.is_private or not addr.is_global:
        nets = allowed_networks(allow_private)
        if nets is None or any(addr in n for n in nets):
            return None
        return "loopback" if addr.is_loopback else "link_local" if addr.is_link_local else "private"
    if addr.is_reserved:
        return "reserved"
    return None


def extract_links(html: str, base_url: str) -> list[str]:
    """Absolute targets of <a href> and <area href>, resolved against <base href> when the page has one."""
    import lxml.html

    try:
        tree = lxml.html.document_fromstring(html.encode("utf-8", "replace"),
                                             parser=lxml.html.HTMLParser(encoding="utf-8"))
    except Exception:  # noqa: BLE001 - lxml.etree.ParserError on empty or garbage documents
        return []
    base = base_url
    for el in tree.iter("base"):
        if el.get("href"):
            base = urljoin(base_url, el.get("href").strip())
            break
    links = []
    for el in tree.iter("a", "area"):
        href = el.get("href")
        if href and href.strip() and not href.strip().startswith("#"):
            links.append(urljoin(base, href.strip()))
    return links
