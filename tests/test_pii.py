"""PII removal: every kind in several formats is replaced, and look-alikes survive byte for byte."""
from __future__ import annotations

import ipaddress
from collections import Counter

import pytest

from lmforge.data.base import Document, StepStats, counted
from lmforge.data.pii import ALL_KINDS, luhn_ok, pii_step, scrub_pii

# (kind, text, expected text): each text holds exactly one item of its kind, in sentence context.
POSITIVES = [
    # email
    ("email", "Write to john.doe@example.com today.", "Write to [EMAIL] today."),
    ("email", "Mail: first.last+tag@sub.example.co.uk, thanks", "Mail: [EMAIL], thanks"),
    ("email", "From: <jane_doe99@mail-server.org>", "From: <[EMAIL]>"),
    ("email", "Contact ADMIN@EXAMPLE.COM.", "Contact [EMAIL]."),
    ("email", "mailto:o.brien@uni.edu?subject=hi", "mailto:[EMAIL]?subject=hi"),
    ("email", "(a-b%c@x-y.io)", "([EMAIL])"),
    ("email", "logo@company.com is the brand inbox", "[EMAIL] is the brand inbox"),
    # phone
    ("phone", "Call +44 20 7946 0958 now.", "Call [PHONE] now."),
    ("phone", "Call +1-202-555-0143.", "Call [PHONE]."),
    ("phone", "Office: (202) 555-0143", "Office: [PHONE]"),
    ("phone", "Office: (202)555-0143", "Office: [PHONE]"),
    ("phone", "Cell 202-555-0143, evenings", "Cell [PHONE], evenings"),
    ("phone", "Fax 202.555.0143.", "Fax [PHONE]."),
    ("phone", "London +44 (0)20 7946 0958.", "London [PHONE]."),
    ("phone", "Paris +33 1 23 45 67 89.", "Paris [PHONE]."),
    ("phone", "Toll free 1-800-555-0199!", "Toll free [PHONE]!"),
    ("phone", "US +1 (202) 555-0143.", "US [PHONE]."),
    ("phone", "E.164: +442079460958", "E.164: [PHONE]"),
    ("phone", "tel=+49 30 901820;", "tel=[PHONE];"),
    ("phone", "Mobil +49 1511234567.", "Mobil [PHONE]."),
    # ssn
    ("ssn", "SSN 123-45-6789 on file.", "SSN [SSN] on file."),
    ("ssn", "ssn: 078-05-1120.", "ssn: [SSN]."),
    ("ssn", "(555-12-3456)", "([SSN])"),
    # credit card (Luhn-valid, issuer prefixes of Visa, Mastercard, Amex, Discover, Diners)
    ("credit_card", "Card 4111 1111 1111 1111 was charged.", "Card [CREDIT_CARD] was charged."),
    ("credit_card", "Card 4111-1111-1111-1111.", "Card [CREDIT_CARD]."),
    ("credit_card", "Card: 4111111111111111", "Card: [CREDIT_CARD]"),
    ("credit_card", "MC 5555 5555 5555 4444 exp 12/25", "MC [CREDIT_CARD] exp 12/25"),
    ("credit_card", "Amex 378282246310005.", "Amex [CREDIT_CARD]."),
    ("credit_card", "Amex 3782 822463 10005.", "Amex [CREDIT_CARD]."),
    ("credit_card", "Discover 6011111111111117", "Discover [CREDIT_CARD]"),
    ("credit_card", "Diners 30569309025904", "Diners [CREDIT_CARD]"),
    ("credit_card", "old Visa 4222222222222", "old Visa [CREDIT_CARD]"),
    ("credit_card", "19 digits 4171234567890123459.", "19 digits [CREDIT_CARD]."),
    ("credit_card", "card 5555 5555 5555 4444 123 cvv", "card [CREDIT_CARD] 123 cvv"),
    ("credit_card", "csv,4111111111111111,ok", "csv,[CREDIT_CARD],ok"),
    # ip (globally routable only)
    ("ip", "DNS 8.8.8.8 answered.", "DNS [IP] answered."),
    ("ip", "GET http://8.8.4.4/path", "GET http://[IP]/path"),
    ("ip", "host 93.184.216.34, port 80", "host [IP], port 80"),
    ("ip", "Just outside TEST-NET-3: 203.0.114.5", "Just outside TEST-NET-3: [IP]"),
    ("ip", "Cloudflare 2606:4700:4700::1111 resolves.", "Cloudflare [IP] resolves."),
    ("ip", "dial [2001:4860:4860::8888]:53", "dial [[IP]]:53"),
    ("ip", "addr 2a00:1450:4001:82b::200e.", "addr [IP]."),
    ("ip", "upgrade the server, ip 2.0.1.12", "upgrade the server, ip [IP]"),
]

# Look-alikes that must come out unchanged.
NEGATIVES = [
    # versions, OIDs, package pins, asset names
    "Upgrade to version 2.0.1.12 today.",
    "pip install pkg==2.0.1.12",
    "Released 2.0.1.12 last week.",
    "release 2.0.1.12-rc1",
    "Python 3.11.7",
    "tag v1.2.3.4",
    "OID 1.3.6.1.4.1.311",
    "OID 2.5.4.3 is commonName",
    "See section 4.2.1.3.",
    "icon@2x.png",
    "<img src='logo@3x.webp'>",
    "background: url(btn@2X.jpg)",
    "npm i pkg@1.2.3",
    "uses: user/repo@v1.2",
    "npm i lodash@4.17.21",
    "matrix a@b.T",
    "assert_allclose(A, L@D@L.conjugate().T)",
    # ISBNs
    "ISBN 978-3-16-148410-0",
    "ISBN 0-306-40615-2",
    "ISBN 978-0-306-40615-7",
    "ISBN 9780306406157",
    # dates and times
    "on 2024-01-15",
    "on 15/01/2024",
    "on 01.02.2024",
    "on 01-15-2024",
    "at 2024-01-15T10:30:00Z",
    "at 10:30:45",
    "epoch 1700000000",
    "epoch ms 1700000000004",  # Luhn-valid, but no card issuer starts with 1
    "stamp 20240115103000123",
    # order numbers, codes, plain numbers
    "Order #123456789",
    "Invoice INV-2024-000123",
    "tracking 1Z999AA10123456784",
    "sizes 256 512 1024 2048",
    "scores +3 and +5",
    "delta +12 345 rows",
    "pi is 3.1415926535897932",
    "a = +4294967296  # 1 << 32",
    "ref = 36287999999999999/36288000000000",
    "-36210360321495360, 347619459086355456",
    "assembly ('Contract', '1.0.0.0')",
    "network 8.8.8.0/24",
    "p=0.4111111111111111",
    # non-global IPs
    "ping 10.0.0.1",
    "ping 127.0.0.1",
    "ping 192.168.1.100",
    "ping 172.16.5.4",
    "link-local 169.254.1.1",
    "CGNAT 100.64.0.1",
    "TEST-NET-1 192.0.2.1",
    "TEST-NET-2 198.51.100.7",
    "TEST-NET-3 203.0.113.9",
    "mDNS 224.0.0.251",
    "broadcast 255.255.255.255",
    "ip ::1",
    "ip fe80::1",
    "ip fe80::1%eth0",
    "ip 2001:db8::1",
    "ip fd00::1",
    "ip ff02::1",
    "any ::",
    "std::vector<int> a::b;",
    "mac 00:1a:2b:3c:4d:5e",
    "not an ip 999.1.1.1",
    # cards that fail Luhn
    "card 4111 1111 1111 1112",
    "card 4111111111111112",
    "card 1234 5678 9012 3456",
    "digits 4111 1111 1111 1111 2222 3333",
    # SSNs that are never issued
    "ssn 000-12-3456",
    "ssn 666-12-3456",
    "ssn 900-12-3456",
    "ssn 123-00-4567",
    "ssn 123-45-0000",
    "code 123-45-67890",
]


def test_tables_have_every_kind():
    assert {kind for kind, _, _ in POSITIVES} == set(ALL_KINDS)
    assert len(POSITIVES) >= 40 and len(NEGATIVES) >= 60


@pytest.mark.parametrize("kind,text,expected", POSITIVES, ids=[f"{k}:{t}" for k, t, _ in POSITIVES])
def test_positive_is_replaced_and_counted(kind, text, expected):
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts == Counter({kind: 1})
    # the kind alone finds it; every other kind leaves it alone
    assert scrub_pii(text, [kind]) == (expected, Counter({kind: 1}))
    others = [k for k in ALL_KINDS if k != kind]
    assert scrub_pii(text, others) == (text, Counter())


@pytest.mark.parametrize("text", NEGATIVES)
def test_lookalike_survives(text):
    assert scrub_pii(text) == (text, Counter())


def test_all_lookalikes_in_one_document_survive():
    text = "\n".join(NEGATIVES)
    assert scrub_pii(text) == (text, Counter())


def test_counts_per_kind_in_one_document():
    text = ("Mail a@example.com or b@example.org, call +1-202-555-0143 or (202) 555-0199, "
            "SSN 123-45-6789, card 4111 1111 1111 1111, from 8.8.8.8 and 2606:4700:4700::1111 "
            "but not 10.0.0.1; version 2.0.1.12 on 2024-01-15.")
    out, counts = scrub_pii(text)
    assert counts == Counter(email=2, phone=2, ssn=1, credit_card=1, ip=2)
    assert out == ("Mail [EMAIL] or [EMAIL], call [PHONE] or [PHONE], SSN [SSN], card [CREDIT_CARD], "
                   "from [IP] and [IP] but not 10.0.0.1; version 2.0.1.12 on 2024-01-15.")


def test_ip_decision_is_ipaddress_is_global():
    for addr in ["8.8.8.8", "2606:4700:4700::1111", "10.0.0.1", "192.0.2.1", "2001:db8::1", "fe80::1", "::1"]:
        want = ipaddress.ip_address(addr).is_global
        assert (scrub_pii(f"at {addr} now")[0] == "at [IP] now") is want, addr


def test_luhn():
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112") and not luhn_ok("79927398710")


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="accepted: email"):
        scrub_pii("x", ["emails"])
    with pytest.raises(ValueError, match="unknown PII kind"):
        pii_step(["ssn", "passport"])


def test_step_updates_text_counters_and_meta_and_drops_nothing():
    docs = [
        Document("a", "mail a@example.com or b@example.org from 8.8.8.8", meta={"lang": "en"}),
        Document("b", "nothing here but version 2.0.1.12 and 10.0.0.1", meta={"lang": "en"}),
        Document("c", "SSN 123-45-6789, card 4111 1111 1111 1111, call 202-555-0143"),
    ]
    stats = StepStats("pii")
    step = pii_step()
    assert step.name == "pii"
    out = list(counted(step, iter(docs), stats))

    assert [d.id for d in out] == ["a", "b", "c"] and stats.docs_in == stats.docs_out == 3
    assert not stats.drops
    assert stats.counters == Counter(pii_email=2, pii_ip=1, pii_ssn=1, pii_credit_card=1, pii_phone=1)
    assert out[0].text == "mail [EMAIL] or [EMAIL] from [IP]"
    assert out[0].meta == {"lang": "en", "pii": {"email": 2, "ip": 1}}
    assert out[1].text == docs[1].text and out[1].meta == {"lang": "en"}  # no "pii" key when nothing found
    assert out[2].meta == {"pii": {"ssn": 1, "credit_card": 1, "phone": 1}}
    assert docs[0].meta == {"lang": "en"}  # the input document is not mutated


def test_step_with_some_kinds_leaves_the_others():
    stats = StepStats("pii")
    (doc,) = counted(pii_step(kinds=["email"]), [Document("a", "a@example.com 202-555-0143")], stats)
    assert doc.text == "[EMAIL] 202-555-0143"
    assert stats.counters == Counter(pii_email=1)
