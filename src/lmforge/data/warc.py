"""WARC files: the crawler writes request/response records; readers turn WARC/WET records into documents.

Writing (`WarcFile`): one gzip member per record, appended to one `.warc.gz`, so a file cut at a
record boundary is still valid and a resumed crawl can truncate to its last committed offset.
Records are replayable: the response record holds the HTTP status line, headers and body, and a
request record (`WARC-Concurrent-To` the response) holds what we sent. The body is stored
decoded (we read it through httpx, which undoes Content-Encoding), so `Content-Encoding` and
`Transfer-Encoding` are dropped from the stored headers and `Content-Length` is set to the stored
length; the original encodings are kept as `X-Lmforge-Original-*` headers.

Reading (`iter_warc_documents`): `.warc`, `.wet`, gzip per record (`.gz`), or `.bz2`/`.zst`, through warcio.
HTML response records (status 200) become documents with `meta.format` "html" (for the extract
step), WET conversion records become plain-text documents. A truncated or corrupt file yields
every record read before the damage, then is counted (with a `report`) or raises `WarcReadError`.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
import zlib
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from lmforge.data.base import Document
from lmforge.errors import UserError

HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.I)


def url_id(url: str) -> str:
    """The document id of a page: a hash of its normalised URL (crawl and WARC documents agree)."""
    return hashlib.blake2b(url.encode("utf-8"), digest_size=16).hexdigest()


def media_type(content_type: str | None) -> str:
    """'text/html; charset=utf-8' -> 'text/html'."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def is_html_type(content_type: str | None) -> bool:
    return media_type(content_type) in HTML_TYPES


def decode_html(body: bytes, content_type: str | None = None) -> str:
    """Bytes -> str: the header's charset, else a <meta charset> in the first 2 KiB, else UTF-8
    (windows-1252 when the bytes are not UTF-8, as browsers do); never raises."""
    candidates = []
    m = re.search(r"charset\s*=\s*[\"']?([^\s;\"']+)", content_type or "", re.I)
    if m:
        candidates.append(m.group(1))
    m = _META_CHARSET.search(body[:2048])
    if m:
        candidates.append(m.group(1).decode("ascii", "replace"))
    for enc in candidates:
        try:
            return body.decode(enc, errors="replace")
        except LookupError:  # unknown charset name
            continue
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body.decode("cp1252", errors="replace")


def warc_date(ts: float | None = None) -> str:
    dt = datetime.fromtimestamp(ts, timezone.utc) if ts is not None else datetime.now(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


class WarcFile:
    """Append gzip-compressed WARC records to `path`; `sync()` makes them durable and returns the offset.

    A new (or empty) file starts with a warcinfo record.
    """

    def __init__(self, path: str | Path, software: str = "lmforge-crawler"):
        from warcio.warcwriter import WARCWriter

        self.path = Path(path)
        self._fh = open(self.path, "ab")
        self._writer = WARCWriter(self._fh, gzip=True)
        if self._fh.tell() == 0:
            info = {"software": software, "format": "WARC File Format 1.1",
                    "conformsTo": "https://iipc.github.io/warc-specifications/specifications/warc-format/warc-1.1/"}
            self._writer.write_record(self._writer.create_warcinfo_record(self.path.name, info))

    def write_exchange(self, url: str, request_headers: list[tuple[str, str]], status: int, reason: str,
                       response_headers: list[tuple[str, str]], body: bytes, ip: str | None = None,
                       fetched_at: str | None = None, http_version: str = "HTTP/1.1") -> None:
        """One response record (status, headers, body) and the request record that produced it."""
        from warcio.statusandheaders import StatusAndHeaders

        stored, dropped = [], []
        for k, v in response_headers:
            lk = k.lower()
            if lk in ("content-encoding", "transfer-encoding"):  # the body is stored decoded and whole
                dropped.append((f"X-Lmforge-Original-{lk.title()}", v))
            elif lk != "content-length":
                stored.append((k, v))
        stored += dropped + [("Content-Length", str(len(body)))]
        warc_headers = {"WARC-Date": fetched_at or warc_date()}
        if ip:
            warc_headers["WARC-IP-Address"] = ip
        http_headers = StatusAndHeaders(f"{status} {reason}".strip(), stored, protocol=http_version)
        resp = self._writer.create_warc_record(url, "response", payload=io.BytesIO(body), length=len(body),
                                               http_headers=http_headers, warc_headers_dict=warc_headers)
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        req_http = StatusAndHeaders(f"GET {target} HTTP/1.1", list(request_headers), is_http_request=True)
        req = self._writer.create_warc_record(url, "request", payload=io.BytesIO(b""), length=0,
                                              http_headers=req_http,
                                              warc_headers_dict={**warc_headers,
                                                                 "WARC-Concurrent-To": resp.rec_headers.get_header(
                                                                     "WARC-Record-ID")})
        self._writer.write_record(resp)
        self._writer.write_record(req)

    def sync(self) -> int:
        """Flush and fsync; return the end offset (a record boundary)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.flush()
            self._fh.close()


class WarcReadError(UserError):
    """A WARC/WET file ended early or is corrupt after `documents` documents were yielded."""

    def __init__(self, path: Path, kind: str, offset: int, documents: int, detail: str):
        super().__init__(f"{path}: {kind} WARC at byte {offset} after {documents} document(s) ({detail})")
        self.path, self.kind, self.offset, self.documents = path, kind, offset, documents


class SkipReport(Protocol):
    """What `iter_warc_documents` needs of a report (readers.ReadReport fits)."""

    def skip(self, reason: str, where: str) -> None: ...


def iter_warc_documents(path: str | Path, report: SkipReport | None = None) -> Iterator[Document]:
    """Documents from a WARC/WET file: plain or gzip per record (warcio detects it), or a whole .bz2/.zst file.

    - response records: status 200 with an HTML content type -> `Document(text=<decoded HTML>, source=<path>,
      meta={"format": "html", "content_type", "status", "fetched_at", "warc_type"})`; others are counted
      as skipped (`non_html_response`, `http_status`, `empty_record`);
    - resource records with an HTML type likewise; WET `conversion` records (and text/plain
      resources) -> plain-text documents (`meta.format` "text");
    - warcinfo, request, metadata and revisit records carry no document and are not counted.

    The id is `url_id(WARC-Target-URI)` (what the crawler uses for the same page), else the record id.
    A truncated or corrupt file: every record before the damage is yielded; then, with `report`,
    `report.skip("truncated_or_corrupt", "PATH@OFFSET: detail")` and the iterator ends normally;
    without one, `WarcReadError` is raised at the end (catch it to count and go on).
    """
    from warcio.exceptions import ArchiveLoadFailed

    path = Path(path)
    name = path.name.lower()
    mode = "bz2" if name.endswith(".bz2") else "zst" if name.endswith(".zst") else "records"
    done = {"records": 0, "docs": 0, "end": 0}
    try:
        try:
            yield from _iter_records(path, mode, report, done)
        except (ArchiveLoadFailed, _OneGzipStream) as e:
            if mode != "records" or not isinstance(e, _OneGzipStream) and "non-chunked gzip" not in str(e):
                raise
            # one gzip stream around the whole file (`gzip x.warc`): read it so, after the records already read
            yield from _iter_records(path, "gzip", report, done)
    except Exception as e:  # noqa: BLE001 - warcio raises many types (ArchiveLoadFailed, zlib.error, ...)
        detail = f"{type(e).__name__}: {e}"[:200]
        if report is None:
            raise WarcReadError(path, "truncated_or_corrupt", done["end"], done["docs"], detail) from e
        report.skip("truncated_or_corrupt", f"{path}@{done['end']}: {detail}")


def _iter_records(path: Path, mode: str, report: SkipReport | None, done: dict) -> Iterator[Document]:
    """Documents of the records after the first `done["records"]`, counting into `done`."""
    from warcio.archiveiterator import ArchiveIterator

    if mode == "bz2":
        import bz2

        fh = _Frames(path, bz2.BZ2Decompressor)
    elif mode == "zst":
        import zstandard

        fh = _Frames(path, zstandard.ZstdDecompressor().decompressobj)
    elif mode == "gzip":
        fh = _Frames(path, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS))
    else:  # .warc / .wet, plain or gzip record by record (warcio detects it)
        fh = open(path, "rb")
    skip = done["records"]
    with fh:
        it = ArchiveIterator(fh)
        for i, record in enumerate(it):
            if record.rec_type is None or record.length is None:  # warcio's reading of a cut header
                raise EOFError("record header cut short")
            doc, reason = _record_document(record, str(path))
            # after reading: warcio finds a record's extent by reading to its end
            offset, end = it.get_record_offset(), it.get_record_offset() + it.get_record_length()
            # warcio reads a cut record as if it were whole: a block shorter than its Content-Length,
            # or a gzip member without its trailer, is the file's end, not a record
            decomp = it.reader.decompressor if it.reader is not None else None
            cut_block = getattr(record.raw_stream, "limit", 0) > 0
            if mode == "records" and i == 0 and not cut_block and decomp is not None and not decomp.eof:
                raise _OneGzipStream()  # the gzip member goes on past the first record
            if cut_block or (decomp is not None and not decomp.eof):
                raise EOFError("record cut short")
            if i < skip:
                continue
            done["records"], done["end"] = done["records"] + 1, end
            if reason and report is not None:
                report.skip(reason, f"{path}@{offset}")
            if doc is not None:
                done["docs"] += 1
                yield doc
        if mode == "records":  # a partial gzip member or record after the last one: warcio skips it silently
            fh.seek(done["end"])
            if fh.read(65536).strip():
                raise EOFError("unreadable bytes after the last whole record")


class _OneGzipStream(Exception):
    """The file is one gzip stream around all records, not one gzip member per record."""


class _Frames:
    """A whole-file compressed stream (.bz2, .zst; one or more concatenated streams/frames) for warcio.

    A last stream cut short raises OSError once what was decompressed before it has been read:
    bz2/zstandard's own readers raise EOFError (which warcio takes for the normal end of the file)
    or, for zstd, return nothing at all.
    """

    def __init__(self, path: Path, new_decompressor):
        self._new, self._raw = new_decompressor, open(path, "rb")
        self._dec, self._buf, self._fed, self._pos = new_decompressor(), b"", False, 0

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buf) < size:
            chunk = self._raw.read(1 << 16)
            if not chunk:
                if self._fed and not self._dec.eof and not self._buf:
                    raise OSError(f"{self._raw.name}: last compressed stream cut short")
                break
            while chunk:
                self._buf += self._dec.decompress(chunk)
                self._fed = True
                chunk = self._dec.unused_data if self._dec.eof else b""
                if self._dec.eof:
                    self._dec, self._fed = self._new(), False
        out, self._buf = (self._buf, b"") if size < 0 else (self._buf[:size], self._buf[size:])
        self._pos += len(out)
        return out

    def tell(self) -> int:
        return self._pos

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._raw.close()


def _record_document(record, source: str) -> tuple[Document | None, str | None]:
    """(document, None) or (None, skip reason) or (None, None) for records that never hold a document."""
    rtype = record.rec_type
    url = record.rec_headers.get_header("WARC-Target-URI")
    fetched_at = record.rec_headers.get_header("WARC-Date")
    rid = url_id(url) if url else (record.rec_headers.get_header("WARC-Record-ID") or "").strip("<>")
    if rtype == "response":
        if record.http_headers is None:  # e.g. dns: records
            return None, "non_http_response"
        try:
            status = int(record.http_headers.get_statuscode())
        except (TypeError, ValueError):
            return None, "http_status"
        if status != 200:
            return None, "http_status"
        ctype = record.http_headers.get_header("Content-Type")
        if not is_html_type(ctype):
            return None, "non_html_response"
        body = record.content_stream().read()  # de-chunked, Content-Encoding undone
        if not body.strip():
            return None, "empty_record"
        meta = {"format": "html", "content_type": media_type(ctype), "status": status, "fetched_at": fetched_at,
                "warc_type": rtype}
        return Document(id=rid, text=decode_html(body, ctype), url=url, source=source, meta=meta), None
    if rtype in ("conversion", "resource"):
        ctype = record.rec_headers.get_header("Content-Type")
        body = record.content_stream().read()
        if not body.strip():
            return None, "empty_record"
        if is_html_type(ctype):
            meta = {"format": "html", "content_type": media_type(ctype), "fetched_at": fetched_at, "warc_type": rtype}
            return Document(id=rid, text=decode_html(body, ctype), url=url, source=source, meta=meta), None
        if rtype == "conversion" or media_type(ctype).startswith("text/"):
            text = body.decode("utf-8", errors="replace")
            meta = {"format": "text", "fetched_at": fetched_at, "warc_type": rtype}
            return Document(id=rid, text=text, url=url, source=source, meta=meta), None
        return None, "non_text_record"
    return None, None
