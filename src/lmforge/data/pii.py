"""PII removal: emails, phone numbers, US SSNs, credit-card numbers and public IP addresses.

Each kind is one compiled regex (IP: one for v4, one for v6) applied in one `re.sub` pass, skipped
when a cheap necessary-condition search finds nothing; a small check decides what a regex cannot
(Luhn and issuer prefix, `ipaddress.is_global`, asset names like `icon@2x.png`, a version keyword
before a dotted quad). Precision matters as much as recall: version strings, OIDs, ISBNs, dates,
timestamps and order numbers must survive, so every pattern refuses to start or end inside a
longer run of digits, dots or dashes.

Known limits (by design, to keep precision): national phone formats without a `+` country code
other than the US/NANP ones (`020 7946 0958`), space-separated US numbers without parentheses
(`202 555 0143`, too close to lists like `256 512 1024`), 7-digit local numbers, SSNs without
dashes, card numbers outside the brands' prefix and length rules (`CARD_NUMBER`; Maestro 50/56-58
is left out), phone numbers whose `+` is not followed by an ITU country code, and a bare global-looking
dotted quad such as `2.0.1.12` with no keyword before it (counted as an IP; `version 2.0.1.12`,
`==2.0.1.12`, `OID 2.5.4.3` survive).
"""
from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import replace
from typing import Iterable

from lmforge.data.base import Document, MapStep, StepStats
from lmforge.errors import UserError

ALL_KINDS = ("email", "ip", "credit_card", "ssn", "phone")  # also the order the passes run in
PLACEHOLDERS = {"email": "[EMAIL]", "phone": "[PHONE]", "ssn": "[SSN]", "credit_card": "[CREDIT_CARD]", "ip": "[IP]"}

# --- email -------------------------------------------------------------------------------------
# local@domain.tld, the TLD alphabetic (>= 2 letters) and the domain dotted, so `pkg@1.2.3` and
# `user/repo@v1.2` never match. Asset names (`icon@2x.png`) are refused by the `email` check.
EMAIL_RE = re.compile(
    r"(?<![\w.%+@-])"
    r"(?P<local>[A-Za-z0-9_%+-][A-Za-z0-9._%+-]{0,63})"
    r"@(?P<domain>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+(?P<tld>[A-Za-z]{2,63}))"
    r"(?![\w(-]|\.[\w-])"  # `(`: `L@D@L.conjugate()` is a matrix product
)
# File extensions that are not (commonly used) TLDs: `name@2x.png` is an asset, not an address.
# Real ccTLDs that double as extensions (.md, .sh, .py, .pl, .rs, .so) are deliberately absent.
FILE_EXTENSIONS = frozenset(
    "png jpg jpeg gif svg webp ico bmp tif tiff avif heic apng css scss sass less js mjs cjs jsx tsx "
    "json map html htm xml yaml yml txt pdf woff ttf otf eot mp3 mp4 wav ogg webm gz tgz tar whl exe "
    "dll lock toml ini cfg log ipynb".split()
)
_DENSITY_LABEL = re.compile(r"[0-9]+x", re.IGNORECASE)  # the `2x` of `icon@2x.png`

# --- IP addresses ------------------------------------------------------------------------------
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
# Not inside a longer dotted run (versions, OIDs: `1.3.6.1.4.1.311`), nor followed by `-rc1`.
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w-]|\.[0-9])")
# A candidate: hex groups and colons with at least two colons near the start; `ipaddress` decides.
# Timestamps (`10:30:45`) and MAC addresses are candidates that `ipaddress` rejects.
IPV6_RE = re.compile(
    r"(?<![\w:.])(?=[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:)[0-9A-Fa-f:]{2,39}"
    rf"(?:(?<=:){_OCTET}(?:\.{_OCTET}){{3}})?(?![\w:]|\.[0-9])"
)
# The nearest keyword before a dotted quad on its line says whether it is something else (a version,
# an OID, a section number, a pin like `==2.0.1.12`) or an address (`host`, `ip`, `ping`, ...).
_IP_CONTEXT = re.compile(
    r"(?i)(?P<other>\b(?:v|ver|version|versions|release[sd]?|rel|build|rev|revision|update[sd]?|"
    r"upgrade[sd]?|downgrade[sd]?|firmware|fw|patch(?:ed)?|tag(?:ged)?|sdk|kernel|bump(?:ed)?|oid|"
    r"section|sec|chapter|clause|figure|fig|paragraph|para)\b|[=<>~!]=|[\^~§])"
    r"|(?P<address>\b(?:ip|ipv4|ipv6|addr|address(?:es)?|host(?:name)?|server|dns|ping|ssh|gateway|"
    r"proxy|client|subnet|resolver|nameserver|peer)\b)"
)
IP_CONTEXT_CHARS = 32

# --- credit cards ------------------------------------------------------------------------------
# 13-19 digits: contiguous, in 4-groups with one separator (a trailing short group for 13-15 and
# 17-19 digits), or 4-6-4/5 (Amex, Diners). Not part of a decimal, a fraction, a dashed code, an
# E.164 number (`+49...`) or a longer table of 4-digit groups.
CREDIT_CARD_RE = re.compile(
    r"(?<![\w.+-])(?<![0-9] )(?<![0-9]/)"
    r"(?:[0-9]{4}(?P<s>[ -])[0-9]{4}(?P=s)[0-9]{4}(?:(?P=s)[0-9]{4})?(?:(?P=s)[0-9]{1,3})?"
    r"|[0-9]{4}(?P<t>[ -])[0-9]{6}(?P=t)[0-9]{4,5}"
    r"|[0-9]{13,19})"
    r"(?![\w]|[./][0-9]|[ -][0-9]{4})"
)
# Issuer prefix and length per brand (Visa; Mastercard 51-55 and 2221-2720; Amex; Diners; JCB;
# Discover/UnionPay/Maestro 6): a Luhn-valid-by-chance run (1 in 10) must also fit one of these,
# which rules out millisecond epochs (`1700...`), `20240115...` stamps and most big integers.
CARD_NUMBER = re.compile(
    r"4(?:[0-9]{12}|[0-9]{15}|[0-9]{18})"
    r"|(?:5[1-5][0-9]{2}|222[1-9]|22[3-9][0-9]|2[3-6][0-9]{2}|27[01][0-9]|2720)[0-9]{12}"
    r"|3[47][0-9]{13}"
    r"|3(?:0[0-5][0-9]|[689][0-9]{2})[0-9]{10,15}"
    r"|35(?:2[89]|[3-8][0-9])[0-9]{12,15}"
    r"|6[0-9]{15,18}"
)

# --- SSN ---------------------------------------------------------------------------------------
# AAA-GG-SSSS; area 000, 666 and 9xx, group 00 and serial 0000 are never issued.
SSN_RE = re.compile(
    r"(?<![\w.-])(?!000|666|9)[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![\w]|[.-][0-9])"
)

# --- phone -------------------------------------------------------------------------------------
# International: +CC then two or more groups separated by space/dot/dash (or one group of 7+
# digits), optionally led by `(0)` or `(area)`, 8-15 digits in all; or E.164 without separators
# (10-15 digits). US/NANP: (202) 555-0143, 202-555-0143, 202.555.0143 (one separator throughout),
# optional leading `1-`; area and exchange start with 2-9.
PHONE_RE = re.compile(
    r"(?<![\w+@.-])"
    r"(?:\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\)[ .-]?[0-9]{1,8}(?:[ .-][0-9]{1,8}){0,5}"
    r"|(?:[ .-][0-9]{1,8}){2,6}|[ .-][0-9]{7,12})"
    r"|\+[1-9][0-9]{9,14}"
    r"|(?:1[ .-]?)?\([2-9][0-9]{2}\) ?[2-9][0-9]{2}[ .-][0-9]{4}"
    r"|(?:1[.-])?[2-9][0-9]{2}(?P<s>[.-])[2-9][0-9]{2}(?P=s)[0-9]{4})"
    r"(?![\w@]|[.-][0-9])"
)
# ITU country codes (leniently: some unassigned codes inside assigned blocks pass), matched at the
# start of the digits after `+`: rejects `+4294967296` and `+281474976710656` from code.
COUNTRY_CODE = re.compile(
    r"1|7|2(?:0|7|1[1-8]|[2-4][0-9]|5[0-8]|6[0-9]|9[017-9])|3(?:[0-469]|5[0-9]|[78][0-9])"
    r"|4(?:[013-9]|2[013])|5(?:0[0-9]|[1-8]|9[0-9])|6(?:[0-6]|[7-9][0-9])"
    r"|8(?:[1246]|0[08]|5[0-6]|[78][0-9])|9(?:[0-58]|6[0-8]|7[0-9]|9[2-8])"
)
_DIGIT = re.compile(r"[0-9]")

# Cheap necessary conditions, searched before each pass: a regex that starts with a lookbehind is
# tried at every position, one that starts with a character class or literal is scanned for fast.
# A document without a hit skips that pass; most prose has no hit for most kinds.
_MAYBE = {
    "ipv4": re.compile(r"[0-9]\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]"),
    "ipv6": re.compile(r":[0-9A-Fa-f]{0,4}:"),
    "credit_card": re.compile(r"[0-9]{4}[ -]?[0-9]{4}"),
    "ssn": re.compile(r"[0-9]{3}-[0-9]{2}-[0-9]{4}"),
    "phone": re.compile(r"\+[1-9]|[0-9]{3}[ .-][0-9]{4}"),
}


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a string of ASCII digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i & 1:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return CARD_NUMBER.fullmatch(digits) is not None and luhn_ok(digits)


def _is_public_ip(candidate: str) -> bool:
    try:
        ip = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # is_global alone lets multicast and (for IPv6) reserved space through.
    return ip.is_global and not ip.is_multicast and not ip.is_reserved


def _not_ip_context(text: str, start: int) -> bool:
    """True when the nearest keyword before `start` on its line marks a version, OID or section number."""
    window = text[max(0, start - IP_CONTEXT_CHARS):start]
    line_start = window.rfind("\n")
    if line_start >= 0:
        window = window[line_start + 1:]
    last = None
    for last in _IP_CONTEXT.finditer(window):
        pass
    return last is not None and last.group("other") is not None


def scrub_pii(text: str, kinds: Iterable[str] = ALL_KINDS) -> tuple[str, Counter]:
    """Replace PII in `text` by placeholders; return the new text and a Counter of replacements per kind.

    `kinds` picks among ALL_KINDS; the passes always run in ALL_KINDS order (emails before IPs, so an
    address's domain is never read as a host; cards before phones, so a card is not split into phones).
    """
    wanted = _check_kinds(kinds)
    counts: Counter = Counter()

    def email(m: re.Match) -> str:
        domain = m.group("domain")
        if m.group("tld").lower() in FILE_EXTENSIONS or _DENSITY_LABEL.fullmatch(domain.split(".", 1)[0]):
            return m.group(0)
        counts["email"] += 1
        return PLACEHOLDERS["email"]

    def ipv4(m: re.Match) -> str:
        quad = m.group(0)
        # x.y.z.0 names a network (or a version: `1.0.0.0`), not a host someone used
        if quad.endswith(".0") or not _is_public_ip(quad) or _not_ip_context(m.string, m.start()):
            return m.group(0)
        counts["ip"] += 1
        return PLACEHOLDERS["ip"]

    def ipv6(m: re.Match) -> str:
        cand, tail = m.group(0), ""
        if cand.endswith(":") and not cand.endswith("::"):  # `host 2606:4700::1111: ...`
            cand, tail = cand[:-1], ":"
        if not _is_public_ip(cand):
            return m.group(0)
        counts["ip"] += 1
        return PLACEHOLDERS["ip"] + tail

    def card(m: re.Match) -> str:
        cand = m.group(0)
        if _is_card(cand):
            counts["credit_card"] += 1
            return PLACEHOLDERS["credit_card"]
        sep = m.group("s")
        if sep:  # `4111 1111 1111 1111 123`: the trailing short group may be something else
            head, _, last = cand.rpartition(sep)
            if len(last) < 4 and _is_card(head):
                counts["credit_card"] += 1
                return PLACEHOLDERS["credit_card"] + sep + last
        return cand

    def ssn(m: re.Match) -> str:
        counts["ssn"] += 1
        return PLACEHOLDERS["ssn"]

    def phone(m: re.Match) -> str:
        cand = m.group(0)
        if cand.startswith("+"):
            digits = "".join(_DIGIT.findall(cand))
            if not 8 <= len(digits) <= 15 or COUNTRY_CODE.match(digits) is None:
                return cand
        counts["phone"] += 1
        return PLACEHOLDERS["phone"]

    text_now = text
    if "email" in wanted and "@" in text_now:
        text_now = EMAIL_RE.sub(email, text_now)
    if "ip" in wanted:
        if _MAYBE["ipv4"].search(text_now):
            text_now = IPV4_RE.sub(ipv4, text_now)
        if _MAYBE["ipv6"].search(text_now):
            text_now = IPV6_RE.sub(ipv6, text_now)
    if "credit_card" in wanted and _MAYBE["credit_card"].search(text_now):
        text_now = CREDIT_CARD_RE.sub(card, text_now)
    if "ssn" in wanted and _MAYBE["ssn"].search(text_now):
        text_now = SSN_RE.sub(ssn, text_now)
    if "phone" in wanted and _MAYBE["phone"].search(text_now):
        text_now = PHONE_RE.sub(phone, text_now)
    return text_now, counts


def _check_kinds(kinds: Iterable[str]) -> frozenset:
    if isinstance(kinds, str):
        kinds = [kinds]
    wanted = frozenset(kinds)
    unknown = wanted - set(ALL_KINDS)
    if unknown:
        raise UserError(f"unknown PII kind(s) {sorted(unknown)}; accepted: {', '.join(ALL_KINDS)}")
    return wanted


def pii_step(kinds: Iterable[str] = ALL_KINDS) -> MapStep:
    """A MapStep named "pii": scrubs doc.text, adds `pii_<kind>` counts to stats.counters and, when a
    document had any PII, its own counts to `doc.meta["pii"]`. It never drops a document."""
    wanted = _check_kinds(kinds)

    def scrub(doc: Document, stats: StepStats) -> Document:
        text, counts = scrub_pii(doc.text, wanted)
        if not counts:
            return doc
        for kind, n in counts.items():
            stats.counters[f"pii_{kind}"] += n
        return replace(doc, text=text, meta={**doc.meta, "pii": dict(counts)})

    return MapStep("pii", scrub)
