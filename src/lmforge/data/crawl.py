"""A polite, resumable crawler: robots.txt, per-host delay, SSRF guard, WARC + JSONL out.

`crawl(start_url, out_dir)` walks links breadth-first from `start_url` within the allowed domains
and writes to `out_dir`:
  crawl.warc.gz        request + response records of every page kept, redirect and robots.txt
  documents.jsonl      one `Document` per page: main text (extract.py), meta title/language/status/fetched_at
  crawl_state.jsonl    the append-only log a stopped crawl resumes from
  crawl_report.json    `CrawlReport`: pages fetched, documents, skipped by reason, bytes, seconds

Politeness. robots.txt is fetched once per origin (cached in the state log, so a resumed crawl does
not ask again); 4xx means "no rules", 5xx or a network error means "fetch nothing there" for this
run (RFC 9309). The delay between two requests to one host is max(delay_s, the robots Crawl-delay),
counted from the end of one response to the start of the next; requests to one host never overlap;
`concurrency` workers share the frontier, so several hosts are crawled at once. robots.txt rules
and Crawl-delay are read by `protego`, which matches as Google does (RFC 9309): the longest
matching rule wins, `*` matches any characters and `$` anchors the end, so `Disallow: /*.pdf$`
refuses /x.pdf but not /x.pdf?y=1.

Safety. Only http(s); only hosts equal to, or subdomains of, `allowed_domains` (default: the start
URL's host), checked on every link and every redirect hop before anything is resolved, so offsite
hosts are never even looked up. A host's name is resolved once with getaddrinfo and every address
is checked: private, loopback, link-local (and shared/non-global) addresses are refused unless
`allow_private` (True, or a list of networks such as ["127.0.0.0/8"]); multicast, reserved and
unspecified addresses always. The checked answer is pinned: every connection to the host goes to
one of those addresses (the request URL names the address; the Host header, TLS SNI and the
certificate check use the host name), and nothing resolves the name again, so a DNS-rebinding
server has no second answer to give. A pinned answer is kept for `DNS_TTL_S`, then the name is
resolved and checked again. Connections are not kept alive, so a TLS session verified for one
name never carries a request for another name at the same address.
Bodies are streamed and abandoned past `max_bytes`; redirects are followed by hand (at most
`max_redirects`, each hop re-checked); each request has `timeout_s` in all; only text/html and
application/xhtml+xml bodies are read; `trust_env` is off so no proxy from the environment is used.

Resume and at-most-once fetching. Every state change is a line appended (and fsynced) to
crawl_state.jsonl; replaying it rebuilds the frontier, the seen set and the counts.
  1. Before a request, a `claim` line for its URL is made durable. A claimed URL is never requested
     again, whatever happens later.
  2. After the response, the WARC records and the document are appended and fsynced, and only then
     the `page` line recording the outcome, the links queued and the new WARC/JSONL end offsets.
  3. On restart, WARC and JSONL are truncated to the offsets of the last `page` line (dropping
     anything half-written), and URLs claimed without a `page` line — the process died during
     their request — are counted as `interrupted`, not fetched again.
So the server sees each page URL at most once, and documents.jsonl holds each page at most once; a
page is lost only when the process dies between sending its request and recording its response.
(robots.txt is not claimed: a run that died during that one request asks for it again.)
"""
from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable
from urllib.parse import urljoin, urlsplit, urlunsplit

from protego import Protego

from lmforge.data.base import Document
from lmforge.data.crawl_state import CrawlReport, CrawlState, write_json_atomic
from lmforge.data.urls import DEFAULT_PORTS, address_refusal, allowed_networks, extract_links, in_domains, \
    normalize_url
from lmforge.data.warc import WarcFile, decode_html, is_html_type, url_id, warc_date
from lmforge.errors import UserError

DEFAULT_USER_AGENT = "lmforge-crawler/0.1 (+https://github.com/lmforge)"
MAX_ROBOTS_BYTES = 500 * 1024  # RFC 9309: parse at least 500 KiB
DNS_TTL_S = 300.0  # how long a host's checked addresses stay pinned before the name is resolved (and checked) again
WARC_NAME, DOCS_NAME, STATE_NAME, REPORT_NAME = "crawl.warc.gz", "documents.jsonl", "crawl_state.jsonl", \
    "crawl_report.json"


# ------------------------------------------------------------------------------------------------ crawler

def robots_rules(status: int, body: str) -> Protego:
    """The rules a robots.txt answer sets (RFC 9309): 2xx its text, 4xx none, 5xx or unreachable "fetch nothing".

    A pure function of what the server said, so a resumed crawl rebuilds the same rules from its state log."""
    if 200 <= status < 300:
        return Protego.parse(body)
    return Protego.parse("" if 400 <= status < 500 else "User-agent: *\nDisallow: /\n")


def pinned_url(url: str, ip: str) -> str:
    """`url` with its host replaced by the address `ip` (port, path and query kept), for a pinned connection."""
    parts = urlsplit(url)
    host = f"[{ip.replace('%', '%25')}]" if ":" in ip else ip
    return urlunsplit((parts.scheme, host if parts.port is None else f"{host}:{parts.port}", parts.path,
                       parts.query, ""))


@dataclass
class _Hop:
    """One HTTP exchange, kept in memory until its page is committed."""

    url: str
    status: int
    reason: str
    http_version: str
    request_headers: list
    headers: list
    body: bytes
    ip: str | None
    fetched_at: str
    received: int = 0          # body bytes received (also when the body was abandoned)
    skip: str | None = None    # "non_html" or "too_large": the body was not kept

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


class _Host:
    def __init__(self, delay: float, last_end: float | None):
        self.lock = asyncio.Lock()  # one request at a time per host
        self.delay = delay  # max(delay_s, Crawl-delay) once robots.txt is read
        self.last_end = last_end  # loop time the last response to this host ended


class _Crawler:
    def __init__(self, state: CrawlState, warc: WarcFile, docs_fh, *, max_pages, max_depth, delay_s, concurrency,
                 allow_private, allowed_domains, max_bytes, max_redirects, timeout_s, user_agent,
                 extract_timeout_s, progress):
        self.state, self.warc, self.docs_fh = state, warc, docs_fh
        self.max_pages, self.max_depth, self.delay_s = max_pages, max_depth, delay_s
        self.concurrency, self.allow_private, self.domains = concurrency, allow_private, allowed_domains
        self.max_bytes, self.max_redirects, self.timeout_s = max_bytes, max_redirects, timeout_s
        self.user_agent, self.extract_timeout_s, self.progress = user_agent, extract_timeout_s, progress
        self.hosts: dict[str, _Host] = {}
        self.addresses: dict[str, tuple[float, list[str] | str]] = {}  # host -> (resolved at, checked IPs or refusal)
        self.parsers: dict[str, Protego] = {}
        self.robots_locks: dict[str, asyncio.Lock] = {}
        self.active = 0
        self.t0, self.elapsed0 = time.monotonic(), state.elapsed

    # --- checks

    def scope_reason(self, url: str) -> tuple[str | None, str]:
        """(skip reason or None, normalised URL) for a link or redirect target."""
        scheme = urlsplit(url.strip()).scheme.lower()
        if scheme and scheme not in ("http", "https"):
            return "scheme", url.strip()[:300]
        try:
            norm = normalize_url(url)
        except ValueError:
            return "invalid_url", url.strip()[:300]
        host = urlsplit(norm).hostname or ""
        return (None if in_domains(host, self.domains) else "offsite"), norm

    async def address_reason(self, url: str) -> str | None:
        """None when `url`'s host resolves only to allowed addresses (pinned for its connections), else the skip
        reason ("ssrf", or "error" when the lookup failed; a failed lookup is not kept and is tried again)."""
        host, now = urlsplit(url).hostname, time.monotonic()
        pinned = self.addresses.get(host)
        if pinned is None or now - pinned[0] > DNS_TTL_S:
            answer = await self._resolve(url)
            if answer == "error":
                return answer
            self.addresses[host] = pinned = (now, answer)
        return pinned[1] if isinstance(pinned[1], str) else None

    async def _resolve(self, url: str) -> list[str] | str:
        """The host's addresses when every one passes the SSRF check, else "ssrf" (or "error")."""
        parts = urlsplit(url)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                parts.hostname, parts.port or DEFAULT_PORTS[parts.scheme], type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError, OSError):
            return "error"
        ips = list(dict.fromkeys(info[4][0] for info in infos))
        if not ips or any(address_refusal(ip, self.allow_private) for ip in ips):
            return "ssrf"
        return ips

    async def robots_for(self, url: str) -> Protego:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin in self.parsers:
            return self.parsers[origin]
        async with self.robots_locks.setdefault(origin, asyncio.Lock()):
            if origin not in self.parsers:
                if origin not in self.state.robots:
                    await self._fetch_robots(origin)
                status, body = self.state.robots.get(origin, (599, ""))  # unreachable: not saved, asked next run
                rp = robots_rules(status, body)
                host = self.host(parts.hostname)
                host.delay = max(host.delay, float(rp.crawl_delay(self.user_agent) or 0))
                self.parsers[origin] = rp
        return self.parsers[origin]

    async def _fetch_robots(self, origin: str) -> None:
        """GET /robots.txt (redirects followed within the allowed domains); saved in the state log unless
        the server failed (5xx, network error: asked again next run)."""
        url, requests, nbytes, kept = origin + "/robots.txt", 0, 0, None
        status = 599  # unreachable
        for _ in range(self.max_redirects + 1):
            if await self.address_reason(url):
                break
            hop = await self.request(url, robots=True)
            if isinstance(hop, str):
                break
            requests, nbytes, status = requests + 1, nbytes + hop.received, hop.status
            if status in (301, 302, 303, 307, 308) and hop.header("location"):
                reason, url = self.scope_reason(urljoin(url, hop.header("location")))
                status = 404  # redirected away, or too many redirects: "unavailable" (RFC 9309)
                if reason:
                    break
                continue
            if status == 200:
                kept = hop
            break
        if status >= 500:
            self.state.report.requests += requests
            self.state.report.bytes += nbytes
            self.state.robots[origin] = (status, "")
            return
        if kept is not None:
            self.write_hop(kept)
        warc_off, jsonl_off = self.sync_outputs()
        body = kept.body.decode("utf-8", "replace") if kept is not None else ""
        self.state.append({"ev": "robots", "origin": origin, "status": status, "body": body,
                           "requests": requests, "bytes": nbytes, "warc": warc_off, "jsonl": jsonl_off})

    # --- HTTP

    def host(self, hostname: str) -> _Host:
        if hostname not in self.hosts:
            last = self.state.last_claim.get(hostname)  # a previous run's last request to it (wall time)
            now = asyncio.get_running_loop().time()
            self.hosts[hostname] = _Host(self.delay_s, None if last is None else now - (time.time() - last))
        return self.hosts[hostname]

    async def request(self, url: str, robots: bool = False, claim: bool = False) -> _Hop | str:
        """GET `url` in its host's turn (claiming it first when asked); a `_Hop`, or a skip reason."""
        hostname = urlsplit(url).hostname
        host = self.host(hostname)
        loop = asyncio.get_running_loop()
        async with host.lock:
            while host.last_end is not None and host.last_end + host.delay > loop.time():
                await asyncio.sleep(host.last_end + host.delay - loop.time())
            pinned = self.addresses.get(hostname)
            if pinned is None or isinstance(pinned[1], str):
                return "ssrf"  # never connect to an address that was not checked
            if claim:
                self.state.append({"ev": "claim", "url": url, "host": hostname, "t": time.time()})
            try:
                return await asyncio.wait_for(self._get(url, pinned[1], robots), self.timeout_s)
            except (asyncio.TimeoutError, OSError, self.httpx.HTTPError, self.httpx.InvalidURL,
                    self.httpx.StreamError):
                return "error"
            finally:
                host.last_end = loop.time()

    async def _get(self, url: str, ips: list[str], robots: bool) -> _Hop:
        """GET `url` from the first of its checked addresses that accepts a connection.

        The request goes to the address itself; the Host header and TLS SNI name the host, and the
        certificate is verified against that name, so nothing resolves the name a second time."""
        parts = urlsplit(url)
        headers = {"Host": parts.netloc, "User-Agent": self.user_agent, "Accept-Encoding": "gzip, deflate",
                   "Accept": "text/plain,*/*;q=0.5" if robots else "text/html,application/xhtml+xml;q=0.9,*/*;q=0.1"}
        for n, ip in enumerate(ips):
            try:
                async with self.client.stream("GET", pinned_url(url, ip), headers=headers,
                                              extensions={"sni_hostname": parts.hostname}) as resp:
                    return await self._read(url, resp, robots)
            except self.httpx.ConnectError:
                if n == len(ips) - 1:
                    raise
        raise AssertionError("unreachable: ips is never empty")

    async def _read(self, url: str, resp, robots: bool) -> _Hop:
        """The exchange as a `_Hop`: status and headers always, the body only when it is kept."""
        limit = MAX_ROBOTS_BYTES if robots else self.max_bytes
        stream = resp.extensions.get("network_stream")
        addr = stream.get_extra_info("server_addr") if stream is not None else None
        hop = _Hop(url=url, status=resp.status_code, reason=resp.reason_phrase, http_version=resp.http_version,
                   request_headers=resp.request.headers.multi_items(), headers=resp.headers.multi_items(),
                   body=b"", ip=addr[0] if addr else None, fetched_at=warc_date())
        if hop.status != 200:
            return hop  # redirects and errors: status and headers are all we use
        if not robots and not is_html_type(resp.headers.get("content-type")):
            hop.skip = "non_html"
            return hop
        declared = resp.headers.get("content-length")
        if not robots and declared and declared.isdigit() and int(declared) > limit:
            hop.skip = "too_large"
            return hop
        body = bytearray()
        async for chunk in resp.aiter_bytes():  # decoded: the limit holds for gzip bombs too
            body += chunk
            hop.received = len(body)
            if len(body) > limit:
                if robots:  # RFC 9309: parse what fits
                    del body[limit:]
                    break
                hop.skip = "too_large"
                return hop
        hop.body = bytes(body)
        return hop

    # --- pages

    async def process(self, url: str, depth: int) -> None:
        """Fetch one frontier URL (following redirects), then commit its outcome in one step."""
        hops: list[_Hop] = []
        claimed: list[str] = [url]
        skips: dict[str, list[str]] = {}
        queued: list[list] = []
        outcome, doc, current, nbytes, requests = None, None, url, 0, 0
        for n_hop in range(self.max_redirects + 1):
            outcome_url = current  # the URL a skip is counted under
            outcome = await self.address_reason(current)
            if outcome is None and not (await self.robots_for(current)).can_fetch(current, self.user_agent):
                outcome = "robots"
            if outcome:
                break
            hop = await self.request(current, claim=True)
            requests += hop != "ssrf"  # "ssrf" here: re-resolved and refused while waiting its turn, never sent
            if isinstance(hop, str):
                outcome = hop
                break
            nbytes += hop.received
            if hop.skip:
                outcome = hop.skip
                break
            hops.append(hop)
            location = hop.header("location")
            if hop.status in (301, 302, 303, 307, 308) and location:
                if n_hop == self.max_redirects:
                    outcome = "too_many_redirects"
                    break
                reason, target = self.scope_reason(urljoin(current, location))
                if reason is None and target in self.state.seen:
                    reason = "duplicate"  # the target is fetched (or was) under its own name
                if reason:
                    outcome, outcome_url = reason, target
                    self.state.seen.add(target)
                    break
                self.state.seen.add(target)
                claimed.append(target)
                current = target
                continue
            if hop.status != 200:
                outcome = "http_status"
                break
            html = decode_html(hop.body, hop.header("content-type"))
            self.queue_links(html, current, depth, skips, queued)
            doc, outcome = self.document(html, hop, depth)
            break
        if outcome and outcome != "ok":
            skips.setdefault(outcome, []).append(outcome_url)
        self.commit(claimed, outcome or "ok", hops, doc, queued, skips, requests, nbytes,
                    fetched=int(requests > 0))

    def document(self, html: str, hop: _Hop, depth: int) -> tuple[Document | None, str]:
        from lmforge.data.extract import extract_html

        text, meta = extract_html(html, hop.url, timeout_s=self.extract_timeout_s)
        if text is None:
            return None, f"extraction_{meta['extract_failure']}"
        meta = {"format": "text", "title": meta.get("title"), "language": meta.get("language"),
                "status": hop.status, "fetched_at": hop.fetched_at, "depth": depth}
        return Document(id=url_id(hop.url), text=text, url=hop.url, source="crawl",
                        meta={k: v for k, v in meta.items() if v is not None}), "ok"

    def queue_links(self, html: str, page_url: str, depth: int, skips: dict, queued: list) -> None:
        for link in extract_links(html, page_url):
            reason, norm = self.scope_reason(link)
            if norm in self.state.seen:
                continue
            if reason is None and depth + 1 > self.max_depth:
                if norm not in self.state.depth_skipped:
                    self.state.depth_skipped.add(norm)
                    skips.setdefault("depth", []).append(norm)
                continue
            self.state.seen.add(norm)
            if reason:
                skips.setdefault(reason, []).append(norm)
            else:
                queued.append([norm, depth + 1])
                self.state.frontier.append((norm, depth + 1))

    def write_hop(self, hop: _Hop) -> None:
        self.warc.write_exchange(hop.url, hop.request_headers, hop.status, hop.reason, hop.headers, hop.body,
                                 ip=hop.ip, fetched_at=hop.fetched_at, http_version=hop.http_version)

    def sync_outputs(self) -> tuple[int, int]:
        self.docs_fh.flush()
        os.fsync(self.docs_fh.fileno())
        return self.warc.sync(), self.docs_fh.tell()

    def commit(self, claimed, outcome, hops, doc, queued, skips, requests, nbytes, fetched) -> None:
        """Records, document, then the `page` event: no await in here, so no other page interleaves."""
        for hop in hops:
            if hop.status == 200 or 300 <= hop.status < 400:
                self.write_hop(hop)
        if doc is not None:
            self.docs_fh.write((doc.to_json() + "\n").encode("utf-8"))
        warc_off, jsonl_off = self.sync_outputs()
        self.state.append({"ev": "page", "urls": claimed, "outcome": outcome, "queued": queued, "skips": skips,
                           "fetched": fetched, "requests": requests, "bytes": nbytes, "doc": doc is not None,
                           "warc": warc_off, "jsonl": jsonl_off,
                           "elapsed": round(self.elapsed0 + self.seconds(), 3)})
        if self.progress:
            r = self.state.report
            print(f"[{r.fetched}/{self.max_pages} fetched, {r.documents} docs, {len(self.state.frontier)} queued] "
                  f"{outcome}: {claimed[-1] if claimed else ''}", file=sys.stderr, flush=True)

    def seconds(self) -> float:
        """Seconds since this run started."""
        return time.monotonic() - self.t0

    # --- scheduling

    async def run(self) -> None:
        import httpx

        self.httpx = httpx
        self.cond = asyncio.Condition()
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=0)  # see the docstring
        async with httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s), follow_redirects=False,
                                     trust_env=False, limits=limits) as c:
            self.client = c
            await asyncio.gather(*(self.worker() for _ in range(self.concurrency)))

    async def worker(self) -> None:
        def can_take():
            return self.active == 0 or (self.state.frontier and
                                        self.state.report.fetched + self.active < self.max_pages)

        while True:
            async with self.cond:
                await self.cond.wait_for(can_take)
                if not self.state.frontier or self.state.report.fetched >= self.max_pages:
                    self.cond.notify_all()  # nothing left for anyone: let the others see it too
                    return
                url, depth = self.state.frontier.popleft()
                self.active += 1
            try:
                await self.process(url, depth)
            finally:
                async with self.cond:
                    self.active -= 1
                    self.cond.notify_all()


def crawl(start_url: str, out_dir: str | Path, max_pages: int = 100, max_depth: int = 3, delay_s: float = 1.0,
          concurrency: int = 4, allow_private: bool | Iterable[str] = False,
          allowed_domains: Iterable[str] | None = None, max_bytes: int = 5_000_000, max_redirects: int = 5,
          timeout_s: float = 20, user_agent: str = DEFAULT_USER_AGENT,
          extract_timeout_s: float = 10.0, progress: bool = False) -> CrawlReport:
    """Crawl from `start_url` into `out_dir` (see the module docstring); resumes when out_dir holds a crawl.

    `max_pages` bounds the page URLs requested over all runs (rerun with a larger one to go on);
    `max_depth` counts links from the start page (0 = the start page only); `allow_private`: True,
    or networks (e.g. ["127.0.0.0/8"]) exempt from the SSRF guard; `progress`: one line per page on stderr.
    Raises ValueError for a bad argument or an out_dir holding another start URL's crawl. Returns the `CrawlReport`, also written to `out_dir/crawl_report.json`.
    """
    out = Path(out_dir)
    if max_pages < 0 or max_depth < 0 or concurrency < 1 or delay_s < 0 or max_bytes < 1 or max_redirects < 0:
        raise UserError("crawl: max_pages, max_depth, delay_s and max_redirects must be >= 0, "
                         "concurrency and max_bytes >= 1")
    try:
        allowed_networks(allow_private)  # a bad network fails here, not at the first request
    except ValueError as e:
        raise UserError(f"allow_private: {e}; give True or networks such as 127.0.0.0/8") from None
    try:
        seed = normalize_url(start_url)
    except ValueError as e:
        raise UserError(f"start URL {start_url!r}: {e}; give an http:// or https:// URL with a host") from None
    domains = [d.strip().strip(".").lower() for d in (allowed_domains or [urlsplit(seed).hostname]) if d.strip()]
    domains = [d.encode("idna").decode("ascii") if not d.isascii() else d for d in domains]

    out.mkdir(parents=True, exist_ok=True)
    state = CrawlState(out / STATE_NAME, seed, out)
    state.open()
    if state.seed is not None and state.seed != seed:
        state.close()
        raise UserError(f"{out} holds a crawl of {state.seed}, not {seed}: give another --out")
    try:
        for name, key in ((WARC_NAME, "warc"), (DOCS_NAME, "jsonl")):  # drop what no event covers
            with open(out / name, "ab") as f:
                if f.tell() > state.offsets[key]:
                    f.truncate(state.offsets[key])
        lost = sorted(state.claimed - state.finished)
        warc = WarcFile(out / WARC_NAME)
        docs_fh = open(out / DOCS_NAME, "ab")
        try:
            crawler = _Crawler(state, warc, docs_fh, max_pages=max_pages, max_depth=max_depth, delay_s=delay_s,
                               concurrency=concurrency, allow_private=allow_private, allowed_domains=domains,
                               max_bytes=max_bytes, max_redirects=max_redirects, timeout_s=timeout_s,
                               user_agent=user_agent, extract_timeout_s=extract_timeout_s, progress=progress)
            if state.seed is None:
                state.append({"ev": "start", "seed": seed})
                reason, _ = crawler.scope_reason(seed)
                if reason:
                    state.append({"ev": "page", "urls": [], "outcome": "ok", "skips": {reason: [seed]}})
                else:
                    state.append({"ev": "page", "urls": [], "outcome": "ok", "queued": [[seed, 0]]})
                    state.frontier.append((seed, 0))
            state.append({"ev": "run"})
            if lost:  # died during these requests: never asked again (at most once), counted
                state.append({"ev": "page", "urls": lost, "outcome": "interrupted", "skips": {"interrupted": lost},
                              "fetched": len(lost), "requests": len(lost)})
            try:
                asyncio.run(crawler.run())
            finally:
                state.append({"ev": "end", "elapsed": round(crawler.elapsed0 + crawler.seconds(), 3)})
        finally:
            warc.close()
            docs_fh.close()
    finally:
        report = state.report
        report.seconds = round(state.elapsed, 3)
        report.frontier_left = len(state.frontier)
        state.close()
        write_json_atomic(out / REPORT_NAME, report.to_dict())
    return report

