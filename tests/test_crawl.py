"""Crawler and WARC tests against local sites on loopback addresses (nothing else is ever contacted).

An audit hook records every socket connect and name lookup made while a crawl runs in this process
and blocks any that is not loopback or an IP literal, so a broken guard fails the test instead of
reaching the network. Tests that need a host name answer its lookups themselves (`fake_dns`).
"""
from __future__ import annotations

import io
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import require
from lmforge.data.crawl import address_refusal, crawl, extract_links, normalize_url, pinned_url, robots_rules
from lmforge.data.crawl_state import SKIP_REASONS, CrawlState
from lmforge.data.warc import WarcFile, WarcReadError, iter_warc_documents, url_id

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------- network guard

_NET = {"on": False, "connects": [], "lookups": []}


def _audit(event, args):
    if not _NET["on"]:
        return
    if event == "socket.connect" and isinstance(args[1], tuple):
        _NET["connects"].append(args[1][0])
        if not _loopback(args[1][0]):
            raise ConnectionRefusedError(f"test guard: blocked a connect to {args[1][0]}")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        _NET["lookups"].append(host)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise OSError(f"test guard: blocked a name lookup of {host}") from None


def _loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


sys.addaudithook(_audit)


@pytest.fixture
def net_guard():
    _NET.update(on=True, connects=[], lookups=[])
    yield _NET
    _NET["on"] = False


# ---------------------------------------------------------------------------------------------- test site

def html_page(name: str, links: list[str], title: str | None = None) -> bytes:
    title = title or f"Page {name}"
    paras = "".join(
        f"<p>The {name} page, paragraph {i}, tells how the keeper of the {name} lighthouse trims the wick, "
        f"logs the passing ships and watches the weather turn over the grey water every evening.</p>"
        for i in range(3))
    nav = "".join(f'<a href="{href}">link {k}</a> ' for k, href in enumerate(links))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f'<script>var x = 1;</script></head><body><nav>{nav}</nav><main><article><h1>{title}</h1>'
            f"{paras}</article></main><footer>Copyright footer</footer></body></html>").encode()


class Site:
    """A ThreadingHTTPServer on `host` (127.0.0.1) serving `routes`; logs (path, monotonic time) and the Host
    header per request; `tls` (an ssl.SSLContext) makes it HTTPS."""

    def __init__(self, routes: dict, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        self.routes, self.log, self.hosts = routes, [], []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                site.log.append((self.path, time.monotonic()))
                site.hosts.append(self.headers.get("Host"))
                route = site.routes.get(self.path)
                try:
                    if route is None:
                        self._send(404, {"Content-Type": "text/html"}, b"<html>not found</html>")
                    elif callable(route):
                        route(self)
                    else:
                        self._send(*route)
                except (BrokenPipeError, ConnectionResetError):  # a killed client
                    pass

            def _send(self, status, headers, body):
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                if "Content-Length" not in headers and body is not None:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if body:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.log]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


HTML = {"Content-Type": "text/html; charset=utf-8"}


def stream_big(handler):  # no Content-Length: the crawler must stop reading by itself
    handler.send_response(200)
    handler.send_header("Content-Type", "text/html")
    handler.end_headers()
    for _ in range(60):
        handler.wfile.write(b"<p>" + b"big " * 250 + b"</p>\n")


@pytest.fixture
def site():
    routes = {
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\nCrawl-delay: 0.2\n"),
        "/": (200, HTML, html_page("home", [
            "/a", "/b", "/private/secret.html", "http://example.com/", "/old", "/file.pdf", "/big",
            "mailto:someone@example.com", "http://10.0.0.1/admin", "javascript:void(0)", "#top"])),
        "/b": (200, HTML, html_page("b", ["/a", "c?x=1&y=2"])),
        "/c?x=1&y=2": (200, HTML, html_page("c", ["/"])),
        "/d": (200, HTML, html_page("d", ["/e"])),
        "/e": (200, HTML, html_page("e", [])),
        "/old": (301, {"Location": "/landing"}, b""),
        "/landing": (200, HTML, html_page("landing", [])),
        "/file.pdf": (200, {"Content-Type": "application/pdf"}, b"%PDF-1.4 not html"),
        "/big": stream_big,
        "/private/secret.html": (200, HTML, html_page("secret", [])),
    }
    s = Site(routes)
    # spellings of pages already linked: fragment, empty query, upper-case scheme, explicit port
    routes["/a"] = (200, HTML, html_page("a", ["/", "/b", "/a#frag", "/a?", "/d",
                                               f"HTTP://127.0.0.1:{s.server.server_port}/b"]))
    yield s
    s.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------- units

def test_normalize_url():
    assert normalize_url("HTTP://Example.COM:80/a/./b/../c?") == "http://example.com/a/c"
    assert normalize_url("https://ex.com:443") == "https://ex.com/"
    assert normalize_url("http://ex.com/%7euser/%2fx?q=a b&%41=1#frag") == "http://ex.com/~user/%2Fx?q=a%20b&A=1"
    assert normalize_url("http://user:pw@h.com:8080/x/..") == "http://h.com:8080/"
    assert normalize_url("../d?b=2&a=1", base="http://h.com/a/b/c") == "http://h.com/a/d?b=2&a=1"  # order kept
    assert normalize_url("http://bücher.de/straße") == "http://xn--bcher-kva.de/stra%C3%9Fe"
    for bad in ("ftp://h.com/x", "mailto:a@b.c", "http:///nohost", "http://h.com:99999/"):
        with pytest.raises(ValueError):
            normalize_url(bad)


def test_address_refusal():
    assert address_refusal("8.8.8.8") is None
    for ip, why in [("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.0.0.1", "private"),
                    ("169.254.169.254", "link_local"), ("::ffff:127.0.0.1", "loopback"), ("0.0.0.0", "unspecified"),
                    ("224.0.0.1", "multicast"), ("fe80::1", "link_local"), ("100.64.0.1", "private")]:
        assert address_refusal(ip) == why, ip
    assert address_refusal("127.0.0.1", True) is None and address_refusal("10.0.0.1", True) is None
    assert address_refusal("127.0.0.1", ["127.0.0.0/8"]) is None
    assert address_refusal("10.0.0.1", ["127.0.0.0/8"]) == "private"
    assert address_refusal("224.0.0.1", True) == "multicast"  # never, whatever allow_private says


def test_robots_rules_crawl_delay_and_links():
    ua = "lmforge-crawler/0.1 (+x)"
    txt = ("User-agent: other\nCrawl-delay: 5\n\nUser-agent: lmforge-crawler\nCrawl-delay: 0.5\nDisallow: /mine\n\n"
           "User-agent: *\nCrawl-delay: 1\nDisallow: /all\n")
    rules = robots_rules(200, txt)
    assert rules.crawl_delay(ua) == 0.5 and rules.crawl_delay("somebot/1.0") == 1.0  # fractions kept
    assert not rules.can_fetch("http://h/mine", ua) and rules.can_fetch("http://h/all", ua)  # our group only
    assert not rules.can_fetch("http://h/all", "somebot/1.0")
    assert robots_rules(200, "User-agent: *\nDisallow: /x\n").crawl_delay("a/1") is None
    # the longest matching rule wins, whatever the order (urllib.robotparser took the first match)
    rules = robots_rules(200, "User-agent: *\nDisallow: /docs/\nAllow: /docs/public$\n")
    assert rules.can_fetch("http://h/docs/public", ua) and not rules.can_fetch("http://h/docs/public2", ua)
    assert robots_rules(404, "").can_fetch("http://h/anything", ua)  # RFC 9309: unavailable, no rules
    assert not robots_rules(503, "").can_fetch("http://h/", ua) and not robots_rules(599, "").can_fetch("http://h/", ua)
    assert pinned_url("https://example.org:8443/a%20b?q=1", "93.184.216.34") == "https://93.184.216.34:8443/a%20b?q=1"
    assert pinned_url("http://example.org/", "2606:2800:220:1::") == "http://[2606:2800:220:1::]/"
    html = ('<html><head><base href="/dir/"></head><body><a href="p">p</a><a href="#x">x</a>'
            '<area href="/q"></body></html>')
    assert extract_links(html, "http://h/a/b") == ["http://h/dir/p", "http://h/q"]


# ------------------------------------------------------------------------------------------------ crawls

def test_crawl_site(site, tmp_path, net_guard):
    out = tmp_path / "crawl"
    report = crawl(site.url("/"), out, max_depth=2, delay_s=0.05, concurrency=3, max_bytes=20_000,
                   allow_private=["127.0.0.1/32"], allowed_domains=["127.0.0.1", "10.0.0.1"])
    paths = site.paths()
    # each URL once; robots-disallowed, offsite, SSRF, too deep and non-http links never requested
    assert sorted(paths) == sorted(["/robots.txt", "/", "/a", "/b", "/c?x=1&y=2", "/d", "/old", "/landing",
                                    "/file.pdf", "/big"])
    assert not any(p.startswith("/private/") for p in paths)
    assert set(net_guard["connects"]) == {"127.0.0.1"}, net_guard["connects"]  # never 10.0.0.1, never example.com
    assert set(net_guard["lookups"]) <= {"127.0.0.1", "10.0.0.1"}  # example.com not even resolved
    # per-host delay: max(delay_s=0.05, Crawl-delay 0.2), from the end of one response to the next request
    times = [t for _, t in site.log]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= 0.2 - 1e-3, gaps

    sk = report.skipped
    assert (sk["robots"], sk["offsite"], sk["ssrf"], sk["scheme"], sk["non_html"], sk["too_large"], sk["depth"]) == \
        (1, 1, 1, 2, 1, 1, 1), sk
    assert sum(sk.values()) == 8, sk  # nothing else skipped
    assert report.examples["ssrf"] == ["http://10.0.0.1/admin"]
    assert report.fetched == 8 and report.requests == 10 and report.documents == 6 and report.frontier_left == 0
    assert report.bytes > 6 * 1000 and report.seconds >= 9 * 0.2 and report.runs == 1
    assert json.loads((out / "crawl_report.json").read_text()) == report.to_dict()

    docs = read_jsonl(out / "documents.jsonl")
    by_url = {d["url"]: d for d in docs}
    assert sorted(by_url) == sorted(site.url(p) for p in ["/", "/a", "/b", "/c?x=1&y=2", "/d", "/landing"])
    for d in docs:
        assert d["id"] == url_id(d["url"]) and d["source"] == "crawl"
        assert "keeper of the" in d["text"] and "var x" not in d["text"] and "Copyright footer" not in d["text"]
        assert d["meta"]["language"] == "en" and d["meta"]["status"] == 200 and d["meta"]["fetched_at"]
    assert by_url[site.url("/landing")]["meta"]["title"] == "Page landing"

    # the WARC replays: each kept response with its HTTP headers and the request that asked for it
    from warcio.archiveiterator import ArchiveIterator

    responses, requests = {}, set()
    with open(out / "crawl.warc.gz", "rb") as f:
        for rec in ArchiveIterator(f):
            uri = rec.rec_headers.get_header("WARC-Target-URI")
            if rec.rec_type == "response":
                responses[uri] = (rec.http_headers.get_statuscode(), rec.content_stream().read())
            elif rec.rec_type == "request":
                requests.add(uri)
    assert set(responses) == set(by_url) | {site.url("/old"), site.url("/robots.txt")} == requests
    assert responses[site.url("/old")][0] == "301"
    assert b"keeper of the landing" in responses[site.url("/landing")][1]
    warc_docs = list(iter_warc_documents(out / "crawl.warc.gz"))
    assert {d.id for d in warc_docs} == {d["id"] for d in docs}
    assert all(d.meta["format"] == "html" for d in warc_docs)


def test_ssrf_guard_refuses_loopback_by_default(site, tmp_path, net_guard):
    report = crawl(site.url("/"), tmp_path / "c", delay_s=0)
    assert report.skipped["ssrf"] == 1 and report.fetched == 0 and report.documents == 0
    assert site.log == [] and net_guard["connects"] == []


def test_robots_wildcards_and_end_anchors_are_honoured(tmp_path, net_guard):
    """Google's robots.txt matching (RFC 9309), which urllib.robotparser ignores: `*` matches any characters and `$`
    ends the path, so `Disallow: /*.pdf$` refuses /x.pdf and /docs/y.pdf but not /x.pdf?y=1 or /x.pdfs."""
    site = Site({
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /*.pdf$\n"),
        "/": (200, HTML, html_page("home", ["/x.pdf", "/x.pdf?y=1", "/x.pdfs", "/docs/y.pdf"])),
        "/x.pdf": (200, HTML, html_page("x", [])),
        "/x.pdf?y=1": (200, HTML, html_page("xq", [])),
        "/x.pdfs": (200, HTML, html_page("xs", [])),
        "/docs/y.pdf": (200, HTML, html_page("y", [])),
    })
    try:
        report = crawl(site.url("/"), tmp_path / "c", delay_s=0, allow_private=["127.0.0.1/32"])
    finally:
        site.close()
    assert sorted(site.paths()) == ["/", "/robots.txt", "/x.pdf?y=1", "/x.pdfs"]
    assert report.skipped["robots"] == 2 and report.documents == 3
    assert sorted(report.examples["robots"]) == [site.url("/docs/y.pdf"), site.url("/x.pdf")]


class FakeDNS:
    """socket.getaddrinfo for made-up names: each lookup of NAME takes the next of its answers (the last repeats);
    `calls` counts lookups per name. IP literals and other names go to the real getaddrinfo (and the guard)."""

    def __init__(self, real):
        self.real, self.answers, self.calls = real, {}, Counter()

    def __call__(self, host, port, family=0, type=0, proto=0, flags=0):
        name = host.decode() if isinstance(host, bytes) else host
        if name not in self.answers:
            return self.real(host, port, family, type, proto, flags)
        self.calls[name] += 1
        answers = self.answers[name]
        ip = answers[min(self.calls[name], len(answers)) - 1]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port or 0)))]


@pytest.fixture
def fake_dns(monkeypatch):
    dns = FakeDNS(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", dns)
    return dns


def _rebind_sites(routes: dict, tls: ssl.SSLContext | None = None) -> tuple[Site, Site]:
    """The site on 127.0.0.2 (allowed: it stands for a public address) and a recorder on 127.0.0.1 at the same port
    (refused: the internal service a rebinding answer points at)."""
    public = Site(routes, host="127.0.0.2", tls=tls)
    try:
        internal = Site({}, host="127.0.0.1", port=public.server.server_port, tls=tls)
    except OSError:
        public.close()
        raise
    return public, internal


def test_dns_rebinding_connects_only_to_the_checked_address(tmp_path, net_guard, fake_dns, monkeypatch):
    """rebind.test answers an allowed address to the first lookup and loopback to every later one. The crawler looks
    the name up once, checks that answer and sends every request (robots.txt included) to that address, with the
    name in the Host header; the service on loopback never sees a request."""
    import lmforge.data.crawl as crawl_module

    public, internal = _rebind_sites({
        "/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow:\n"),
        "/": (200, HTML, html_page("home", ["/a"])), "/a": (200, HTML, html_page("a", []))})
    port = public.server.server_port
    fake_dns.answers["rebind.test"] = ["127.0.0.2", "127.0.0.1"]
    try:
        report = crawl(f"http://rebind.test:{port}/", tmp_path / "c", delay_s=0, allow_private=["127.0.0.2/32"])
        assert fake_dns.calls["rebind.test"] == 1  # one lookup for the whole crawl: nothing resolves it again
        assert internal.log == [] and set(net_guard["connects"]) == {"127.0.0.2"}
        assert sorted(public.paths()) == ["/", "/a", "/robots.txt"] and report.documents == 2
        assert set(public.hosts) == {f"rebind.test:{port}"}
        urls = [d["url"] for d in read_jsonl(tmp_path / "c" / "documents.jsonl")]
        assert sorted(urls) == [f"http://rebind.test:{port}/", f"http://rebind.test:{port}/a"]

        # Once the pinned answer is stale the name is resolved again, and the new answer is checked like the first.
        monkeypatch.setattr(crawl_module, "DNS_TTL_S", -1.0)
        fake_dns.answers["rebind.test"], fake_dns.calls["rebind.test"] = ["127.0.0.2", "127.0.0.1"], 0
        report = crawl(f"http://rebind.test:{port}/", tmp_path / "d", delay_s=0, allow_private=["127.0.0.2/32"])
        assert fake_dns.calls["rebind.test"] == 2 and internal.log == []
        assert report.skipped["robots"] == 1 and report.documents == 0  # robots.txt's host refused: fetch nothing
    finally:
        public.close()
        internal.close()


def _tls_context(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, Path]:
    """A server context with a self-signed certificate for `name` only (no IP address in it), and the cert file."""
    openssl = require("openssl", binary=True, why="makes the test's TLS certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
                    "-addext", f"subjectAltName=DNS:{name}"], check=True, capture_output=True)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx, cert


def test_tls_to_the_pinned_address_verifies_the_host_name(tmp_path, net_guard, fake_dns, monkeypatch):
    """HTTPS to a pinned address: SNI names the host and the certificate is checked against the name (it holds no IP
    address), so the crawl succeeds for rebind.test and fails for another name at the same address."""
    import certifi

    ctx, cert = _tls_context(tmp_path, "rebind.test")
    monkeypatch.setattr(certifi, "where", lambda: str(cert))  # trust the test certificate (httpx reads certifi)
    public, internal = _rebind_sites({
        "/robots.txt": (404, {"Content-Type": "text/plain"}, b"none"),
        "/": (200, HTML, html_page("home", []))}, tls=ctx)
    port = public.server.server_port
    fake_dns.answers.update({"rebind.test": ["127.0.0.2", "127.0.0.1"], "other.test": ["127.0.0.2"]})
    try:
        report = crawl(f"https://rebind.test:{port}/", tmp_path / "c", delay_s=0, allow_private=["127.0.0.2/32"])
        assert report.documents == 1 and sorted(public.paths()) == ["/", "/robots.txt"] and internal.log == []
        assert set(public.hosts) == {f"rebind.test:{port}"}
        report = crawl(f"https://other.test:{port}/", tmp_path / "d", delay_s=0, allow_private=["127.0.0.2/32"])
        assert report.documents == 0 and len(public.log) == 2  # the handshake failed: no request was read
    finally:
        public.close()
        internal.close()


def test_crawl_redirects_timeouts_encodings(tmp_path, net_guard):
    import gzip

    def slow(handler):  # outlives the crawler's timeout; only a server thread waits for it
        time.sleep(5.0)
        handler._send(200, HTML, html_page("slowpoke", []))

    gz_body = gzip.compress(html_page("gzipped", []))
    latin = html_page("latin", []).replace(b"lighthouse", "caf\u00e9 lighthouse".encode("latin-1"))
    site = Site({
        "/robots.txt": (404, {"Content-Type": "text/plain"}, b"none"),  # no robots.txt: everything allowed
        "/": (200, HTML, html_page("home", ["/loop1", "/away", "/slowpoke", "/gz", "/latin", "/err", "/self"])),
        "/loop1": (302, {"Location": "/loop2"}, b""),
        "/loop2": (302, {"Location": "/loop3"}, b""),
        "/loop3": (302, {"Location": "/loop4"}, b""),
        "/away": (301, {"Location": "http://example.org/"}, b""),
        "/self": (301, {"Location": "/"}, b""),
        "/slowpoke": slow,
        "/gz": (200, {"Content-Type": "text/html", "Content-Encoding": "gzip"}, gz_body),
        "/latin": (200, {"Content-Type": "text/html; charset=iso-8859-1"}, latin.replace(b"utf-8", b"iso-8859-1")),
        "/err": (500, HTML, b"<html>boom</html>"),
    })
    try:
        report = crawl(site.url("/"), tmp_path / "c", delay_s=0, max_redirects=2, timeout_s=0.8,
                       allow_private=["127.0.0.0/8"])
    finally:
        site.close()
    assert sorted(site.paths()) == sorted(["/robots.txt", "/", "/loop1", "/loop2", "/loop3", "/away", "/self",
                                           "/slowpoke", "/gz", "/latin", "/err"])
    sk = report.skipped
    assert (sk["too_many_redirects"], sk["offsite"], sk["duplicate"], sk["error"], sk["http_status"]) == (1, 1, 1, 1, 1)
    assert report.examples["offsite"] == ["http://example.org/"] and set(net_guard["connects"]) == {"127.0.0.1"}
    docs = {d["url"].rsplit("/", 1)[1]: d for d in read_jsonl(tmp_path / "c" / "documents.jsonl")}
    assert sorted(docs) == ["", "gz", "latin"]
    assert "keeper of the gzipped" in docs["gz"]["text"] and "caf\u00e9 lighthouse" in docs["latin"]["text"]
    from warcio.archiveiterator import ArchiveIterator

    with open(tmp_path / "c" / "crawl.warc.gz", "rb") as f:
        gz = next(r for r in ArchiveIterator(f) if r.rec_type == "response"
                  and r.rec_headers.get_header("WARC-Target-URI").endswith("/gz"))
        assert gz.http_headers.get_header("Content-Encoding") is None  # stored decoded
        assert gz.http_headers.get_header("X-Lmforge-Original-Content-Encoding") == "gzip"
        assert b"keeper of the gzipped" in gz.content_stream().read()


def _small_site(n: int = 6) -> dict:
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow:\n")}
    top = [f"/p{i}" for i in range(n)]
    top.insert(3, "/slow")
    routes["/"] = (200, HTML, html_page("home", top))
    for i in range(n):
        routes[f"/p{i}"] = (200, HTML, html_page(f"p{i}", [f"/q{i}", "/"]))
        routes[f"/q{i}"] = (200, HTML, html_page(f"q{i}", []))

    def slow(handler):  # long enough for the test to see the request and kill the crawler during it
        time.sleep(3.0)
        handler._send(200, HTML, html_page("slow", []))
    routes["/slow"] = slow
    return routes


def test_resume_after_sigkill_fetches_nothing_twice(tmp_path):
    site = Site(_small_site())
    out = tmp_path / "crawl"
    code = (f"from lmforge.data.crawl import crawl; crawl({site.url('/')!r}, {str(out)!r}, delay_s=0.02, "
            "concurrency=2, allow_private=True)")
    try:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while "/slow" not in site.paths():  # killed while its request to /slow is in flight
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = len(site.log)
        assert before >= 5  # robots, /, p0..p2 done before the kill

        report = crawl(site.url("/"), out, delay_s=0.02, concurrency=2, allow_private=True)
    finally:
        site.close()
    paths = site.paths()
    assert all(n == 1 for n in Counter(paths).values()), Counter(paths)  # robots.txt included
    assert report.runs == 2 and report.skipped["interrupted"] == 1 and report.examples["interrupted"] == [
        site.url("/slow")]
    pages = {p for p in paths if p != "/robots.txt"}
    docs = read_jsonl(out / "documents.jsonl")
    urls = [d["url"] for d in docs]
    assert len(urls) == len(set(urls))
    assert set(urls) == {site.url(p) for p in pages - {"/slow"}}  # everything requested and answered, once
    assert report.documents == len(docs) == 13 and report.fetched == 14
    assert {d.id for d in iter_warc_documents(out / "crawl.warc.gz")} == {d["id"] for d in docs}


def test_resume_drops_torn_writes_and_continues(tmp_path):
    site = Site(_small_site(3))
    site.routes["/slow"] = site.routes["/p0"]
    out = tmp_path / "crawl"
    try:
        r1 = crawl(site.url("/"), out, max_pages=3, delay_s=0, allow_private=True)
        assert r1.fetched == 3 and r1.frontier_left > 0
        # a crash in the middle of writing: partial lines and a partial gzip member
        with open(out / "documents.jsonl", "ab") as f:
            f.write(b'{"id": "torn", "text": "half')
        with open(out / "crawl.warc.gz", "ab") as f:
            f.write(b"\x1f\x8b\x08\x00garbage")
        with open(out / "crawl_state.jsonl", "ab") as f:
            f.write(b'{"ev": "page", "urls": ["http://x/"')
        r2 = crawl(site.url("/"), out, max_pages=100, delay_s=0, allow_private=True)
        with pytest.raises(ValueError, match="holds a crawl of"):
            crawl(site.url("/p1"), out, allow_private=True)
    finally:
        site.close()
    assert all(n == 1 for n in Counter(site.paths()).values())
    docs = read_jsonl(out / "documents.jsonl")
    assert len(docs) == len({d["url"] for d in docs}) == r2.documents == 8 and r2.frontier_left == 0
    assert len(list(iter_warc_documents(out / "crawl.warc.gz"))) == 8  # no WarcReadError: the tail was cut


# -------------------------------------------------------------------------------------------------- WARC

def _write_warc(path: Path, n: int) -> None:
    w = WarcFile(path)
    for i in range(n):
        w.write_exchange(f"http://h.test/p{i}", [("Host", "h.test")], 200, "OK",
                         [("Content-Type", "text/html; charset=utf-8"), ("Content-Encoding", "gzip")],
                         f"<html><body><p>page {i} {'words ' * 400}</p></body></html>".encode())
    w.write_exchange("http://h.test/img.png", [], 200, "OK", [("Content-Type", "image/png")], b"\x89PNG")
    w.write_exchange("http://h.test/gone", [], 404, "Not Found", [("Content-Type", "text/html")], b"<html>x</html>")
    w.close()


class _Report:
    def __init__(self):
        self.skipped = Counter()

    def skip(self, reason, where):
        self.skipped[reason] += 1


def test_iter_warc_documents_and_truncation(tmp_path):
    p = tmp_path / "a.warc.gz"
    _write_warc(p, 4)
    rep = _Report()
    docs = list(iter_warc_documents(p, rep))
    assert [d.url for d in docs] == [f"http://h.test/p{i}" for i in range(4)]
    assert docs[0].id == url_id("http://h.test/p0") and docs[0].meta["format"] == "html"
    assert "page 0" in docs[0].text
    assert rep.skipped == {"non_html_response": 1, "http_status": 1}

    data = p.read_bytes()
    for cut in (len(data) // 2, len(data) - 5, 40):
        t = tmp_path / f"cut{cut}.warc.gz"
        t.write_bytes(data[:cut])
        got = []
        with pytest.raises(WarcReadError) as e:
            for d in iter_warc_documents(t):
                got.append(d)
        assert e.value.documents == len(got) and all("words" in d.text for d in got)
        rep = _Report()
        assert len(list(iter_warc_documents(t, rep))) == len(got) and rep.skipped["truncated_or_corrupt"] == 1
    # uncompressed, cut inside a record: the whole records before it are yielded
    import gzip

    raw = tmp_path / "b.warc"
    raw.write_bytes(gzip.decompress(data)[:-200])
    rep = _Report()
    assert len(list(iter_warc_documents(raw, rep))) == 4 and rep.skipped["truncated_or_corrupt"] == 1


def test_iter_wet_conversion_records(tmp_path):
    from warcio.warcwriter import WARCWriter

    p = tmp_path / "x.warc.wet.gz"
    with open(p, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i in range(2):
            rec = w.create_warc_record(f"http://w.test/{i}", "conversion",
                                       payload=io.BytesIO(f"plain text {i}".encode()),
                                       warc_content_type="text/plain")
            w.write_record(rec)
    docs = list(iter_warc_documents(p))
    assert [(d.text, d.meta["format"], d.meta["warc_type"], d.source) for d in docs] == [
        ("plain text 0", "text", "conversion", str(p)), ("plain text 1", "text", "conversion", str(p))]
    assert docs[0].id == url_id("http://w.test/0") and docs[0].url == "http://w.test/0"


def test_state_log_replay_rebuilds_counts_frontier_and_offsets(tmp_path):
    """What a resumed crawl starts from: the report, the frontier (claimed URLs left out), robots answers and the
    output offsets are rebuilt from crawl_state.jsonl alone, and a half-written last line is dropped."""
    path = tmp_path / "crawl_state.jsonl"
    state = CrawlState(path, "http://h/", tmp_path)
    state.open()
    for ev in ({"ev": "start", "seed": "http://h/"}, {"ev": "run"},
               {"ev": "page", "urls": [], "outcome": "ok", "queued": [["http://h/", 0]]},
               {"ev": "robots", "origin": "http://h", "status": 200, "body": "User-agent: *\nDisallow: /p/\n",
                "requests": 1, "bytes": 30, "warc": 100, "jsonl": 0},
               {"ev": "claim", "url": "http://h/", "host": "h", "t": 1000.0},
               {"ev": "page", "urls": ["http://h/"], "outcome": "ok", "fetched": 1, "requests": 1, "bytes": 500,
                "doc": True, "queued": [["http://h/a", 1], ["http://h/b", 1]],
                "skips": {"robots": ["http://h/p/x"], "depth": ["http://h/deep"]}, "warc": 900, "jsonl": 300,
                "elapsed": 2.5},
               {"ev": "claim", "url": "http://h/a", "host": "h", "t": 1001.0}):
        state.append(ev)
    state.close()
    with open(path, "ab") as f:
        f.write(b'{"ev": "page", "urls": ["http://h/a"], "fetched": 1')  # the crash came mid-line

    again = CrawlState(path, "http://h/", tmp_path)
    again.open()
    again.close()
    r = again.report
    assert (again.seed, r.runs, r.fetched, r.documents, r.requests, r.bytes) == ("http://h/", 1, 1, 1, 2, 530)
    assert list(again.frontier) == [("http://h/b", 1)]  # http://h/a was claimed: never requested again
    assert again.claimed - again.finished == {"http://h/a"}  # counted as interrupted by the next run
    assert again.offsets == {"warc": 900, "jsonl": 300} and again.elapsed == 2.5
    assert again.robots == {"http://h": (200, "User-agent: *\nDisallow: /p/\n")}
    assert again.last_claim == {"h": 1001.0}
    assert "http://h/deep" in again.depth_skipped and "http://h/deep" not in again.seen  # a later, shallower link may
    assert {"http://h/", "http://h/a", "http://h/b", "http://h/p/x"} <= again.seen
    d = r.to_dict()
    assert list(d["skipped"]) == list(SKIP_REASONS)  # every reason is reported, also at 0
    assert {k: v for k, v in d["skipped"].items() if v} == {"robots": 1, "depth": 1}
    assert d["examples"] == {"robots": ["http://h/p/x"], "depth": ["http://h/deep"]}
    assert path.read_bytes().endswith(b"}\n")  # the torn line is cut from the log itself


def test_iter_warc_whole_file_compression(tmp_path):
    import bz2
    import gzip

    import zstandard

    p = tmp_path / "a.warc.gz"
    _write_warc(p, 3)
    raw = gzip.decompress(p.read_bytes())
    zc = zstandard.ZstdCompressor()
    half = len(raw) // 2
    for suffix, packed in ((".bz2", bz2.compress(raw[:half]) + bz2.compress(raw[half:])),
                           (".zst", zc.compress(raw[:half]) + zc.compress(raw[half:]))):
        whole, cut = tmp_path / f"b.warc{suffix}", tmp_path / f"c.warc{suffix}"
        whole.write_bytes(packed)
        cut.write_bytes(packed[:-100])
        assert len(list(iter_warc_documents(whole))) == 3, suffix
        rep = _Report()
        assert 1 <= len(list(iter_warc_documents(cut, rep))) < 3, suffix  # what was readable, then counted
        assert rep.skipped["truncated_or_corrupt"] == 1, suffix


def test_iter_warc_one_gzip_stream(tmp_path):
    """`gzip x.warc` (one gzip stream, not one member per record) reads too; cut, it yields what it can."""
    import gzip
    import random

    rng = random.Random(0)
    w = WarcFile(tmp_path / "src.warc.gz")
    for i in range(4):  # incompressible bodies: the first record does not end the gzip stream's first block
        body = " ".join(str(rng.random()) for _ in range(3000))
        w.write_exchange(f"http://h.test/{i}", [], 200, "OK", [("Content-Type", "text/html")],
                         f"<html><body><p>{body}</p></body></html>".encode())
    w.close()
    one = gzip.compress(gzip.decompress((tmp_path / "src.warc.gz").read_bytes()))
    (tmp_path / "one.warc.gz").write_bytes(one)
    assert [d.url for d in iter_warc_documents(tmp_path / "one.warc.gz")] == [f"http://h.test/{i}" for i in range(4)]
    (tmp_path / "cut.warc.gz").write_bytes(one[: len(one) * 3 // 4])
    rep = _Report()
    assert 1 <= len(list(iter_warc_documents(tmp_path / "cut.warc.gz", rep))) < 4
    assert rep.skipped["truncated_or_corrupt"] == 1
