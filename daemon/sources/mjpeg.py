"""HTTP MJPEG cameras: ``multipart/x-mixed-replace`` streams, or single-JPEG "snapshot" URLs polled at a rate.

Parts with a Content-Length are read exactly; parts without one are cut at the next boundary line. Anything
between parts is skipped. A part over ``max_frame_bytes`` is discarded as it streams (never buffered whole)
and counted. The connection is supervised: drops, timeouts and HTTP errors back off and reconnect.
"""

from __future__ import annotations

import base64
import http.client
import logging
import socket
import ssl
from dataclasses import dataclass
from email.message import Message
from typing import Protocol
from urllib.parse import urlsplit

from daemon.sources.backoff import Backoff
from daemon.sources.base import Sink, Source, redact_url

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
MAX_HEADER_LINE = 8192
MAX_HEADERS = 64
SNAPSHOT_TYPES = ("image/jpeg", "image/jpg", "image/pjpeg")


class StreamProtocolError(Exception):
    """The camera sent something that is not a multipart JPEG stream."""


class StreamClosed(Exception):
    """The camera closed the stream (EOF or closing boundary)."""


class HttpStatusError(Exception):
    """The camera answered with something other than 200 OK."""


class Readable(Protocol):
    def read1(self, n: int = ..., /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Part:
    """One multipart body: ``data`` is None when larger than the limit (``size`` is then what was seen)."""

    data: bytes | None
    size: int
    content_type: str


class MultipartReader:
    """Reads parts from a multipart/x-mixed-replace body, bounded in memory by ``max_part_bytes``.

    ``boundary`` is the header's parameter (a leading "--" some cameras include is tolerated); None means
    "take the first line starting with --". ``bytes_in`` counts every byte read from ``raw``.
    """

    def __init__(self, raw: Readable, boundary: str | None, max_part_bytes: int) -> None:
        self._raw = raw
        self._buf = bytearray()
        self._max = max_part_bytes
        self._token: bytes | None = None
        if boundary:
            b = boundary.encode("latin-1")
            self._token = b if b.startswith(b"--") else b"--" + b
        self.bytes_in = 0

    @property
    def buffered(self) -> int:
        """Bytes held in memory right now (bounded by about max_part_bytes + one read)."""
        return len(self._buf)

    def next_part(self) -> Part:
        """The next part; raises StreamClosed at EOF or closing boundary, StreamProtocolError on garbage."""
        self._seek_boundary()
        headers = self._read_headers()
        ctype = headers.get("content-type", "")
        length = headers.get("content-length")
        if length is not None and length.strip().isdigit():
            n = int(length)
            if n > self._max:
                self._skip(n)
                return Part(None, n, ctype)
            return Part(self._read_exact(n), n, ctype)
        return self._read_to_boundary(ctype)

    # -- buffer ----------------------------------------------------------------------------------------------
    def _fill(self) -> None:
        data = self._raw.read1(CHUNK)
        if not data:
            raise StreamClosed("camera closed the connection")
        self.bytes_in += len(data)
        self._buf += data

    def _read_line(self) -> bytes:
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0:
                line = bytes(self._buf[:i])
                del self._buf[: i + 1]
                return line.rstrip(b"\r")
            if len(self._buf) > MAX_HEADER_LINE:
                raise StreamProtocolError(f"header line longer than {MAX_HEADER_LINE} bytes")
            start = len(self._buf)
            self._fill()

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            if not self._buf:
                self._fill()
            k = min(n, len(self._buf))
            del self._buf[:k]
            n -= k

    # -- parts -----------------------------------------------------------------------------------------------
    def _seek_boundary(self) -> None:
        """Consume up to and including the next boundary line (anything before it is skipped)."""
        if self._token is None:
            self._discover_token()
            return
        token = self._token
        skipped = 0
        while True:
            i = self._buf.find(token)
            if i >= 0:
                del self._buf[: i + len(token)]
                rest = self._read_line().strip()
                if not rest:
                    return
                if rest == b"--":
                    raise StreamClosed("camera sent the closing boundary")
                skipped += len(token) + len(rest)  # the token inside some other line: not a delimiter
                continue
            keep = len(token) - 1
            if len(self._buf) > keep:
                skipped += len(self._buf) - keep
                del self._buf[: len(self._buf) - keep]
            if skipped > self._max:
                raise StreamProtocolError(f"no multipart boundary in {skipped} bytes")
            self._fill()

    def _discover_token(self) -> None:
        for _ in range(MAX_HEADERS):
            line = self._read_line().strip()
            if line.startswith(b"--") and len(line) > 2:
                self._token = line
                return
        raise StreamProtocolError("no boundary parameter and no '--boundary' line at the start of the stream")

    def _read_headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADERS):
            line = self._read_line()
            if not line.strip():
                if headers:
                    return headers
                continue  # tolerate blank lines right after the boundary
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise StreamProtocolError(f"malformed part header {line[:60]!r}")
            headers[name.strip().lower()] = value.strip()
        raise StreamProtocolError(f"more than {MAX_HEADERS} part header lines")

    def _read_to_boundary(self, ctype: str) -> Part:
        """A part without Content-Length: everything up to the next boundary line (which stays buffered)."""
        token = self._token or b""
        start = 0
        dropped = 0
        while True:
            end = self._find_delimiter(token, start)
            if end is not None:
                size = dropped + end
                data = None if size > self._max else bytes(self._buf[:end])
                del self._buf[:end]
                return Part(data, size, ctype)
            start = max(0, len(self._buf) - len(token) - 4)
            if len(self._buf) > self._max:  # over the limit: stop keeping the body, keep scanning for the end
                dropped += start
                del self._buf[:start]
                start = 0
            self._fill()

    def _find_delimiter(self, token: bytes, start: int) -> int | None:
        """End of the body before a boundary line at or after ``start`` (CRLF before it excluded), or None."""
        buf = self._buf
        while True:
            i = buf.find(token, start)
            if i < 0:
                return None
            s = i
            while s > 0 and buf[s - 1] == 0x2D:  # "----foo" where the header said "--foo"
                s -= 1
            if s == 0 or buf[s - 1] == 0x0A:
                if s > 0:
                    s -= 1
                    if s > 0 and buf[s - 1] == 0x0D:
                        s -= 1
                return s
            start = i + 1


class HttpMjpegSource(Source):
    """An IP camera over HTTP(S): MJPEG multipart stream, or a JPEG snapshot URL polled at ``max_fps``
    (``snapshot_fps`` when no cap is set). Basic auth is sent when ``username`` is given."""

    def __init__(
        self,
        camera: str,
        url: str,
        sink: Sink,
        timeout_s: float = 10.0,
        username: str | None = None,
        password: str | None = None,
        max_fps: float | None = None,
        max_frame_bytes: int = 20_000_000,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        snapshot_fps: float = 1.0,
    ) -> None:
        super().__init__(camera, sink, max_fps=max_fps, backoff=Backoff(backoff_initial_s, backoff_max_s))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"camera {camera!r}: url must be http(s)://host/..., got {redact_url(url)}")
        if password is not None and username is None:
            raise ValueError(f"camera {camera!r}: a password needs a username")
        if not timeout_s > 0 or max_frame_bytes < 1 or not snapshot_fps > 0:
            raise ValueError(
                f"camera {camera!r}: timeout_s, max_frame_bytes and snapshot_fps must be > 0, "
                f"got {timeout_s}, {max_frame_bytes}, {snapshot_fps}"
            )
        self._url = url
        self._safe_url = redact_url(url)
        self._timeout = timeout_s
        self._max_bytes = max_frame_bytes
        self._poll_period = 1.0 / (max_fps or snapshot_fps)
        self._headers = {"User-Agent": "deltayolo", "Accept": "multipart/x-mixed-replace, image/jpeg"}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        self._conn: http.client.HTTPConnection | None = None

    def _run(self) -> None:
        log.info("camera %s: connecting to %s", self.camera, self._safe_url)
        self._supervise(self._session, "camera closed the stream")

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError | socket.timeout):
            what = f"no data for {self._timeout:g} s"
        elif isinstance(exc, ConnectionRefusedError):
            what = "connection refused"
        elif isinstance(exc, HttpStatusError | StreamProtocolError | StreamClosed):
            what = str(exc)
        else:
            what = super()._describe(exc)
        return f"{self._safe_url}: {what}"

    def _interrupt(self) -> None:
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def _session(self) -> None:
        """One connection: a multipart stream read until it drops, or snapshot polls until one fails."""
        resp = self._request()
        try:
            ctype = resp.getheader("Content-Type", "") or ""
            main = ctype.split(";", 1)[0].strip().lower()
            if main.startswith("multipart/"):
                self._read_stream(resp, ctype)
                return
            if main not in SNAPSHOT_TYPES:
                raise StreamProtocolError(f"unexpected Content-Type {ctype!r} (want multipart or image/jpeg)")
            while True:
                self._read_snapshot(resp)
                self._close()
                if not self._wait(self._poll_period):
                    return
                resp = self._request()
        finally:
            self._close()

    def _request(self) -> http.client.HTTPResponse:
        parts = urlsplit(self._url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname or ""
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            conn = http.client.HTTPSConnection(
                host, parts.port, timeout=self._timeout, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(host, parts.port, timeout=self._timeout)
        self._conn = conn
        if self._stopping:
            raise StreamClosed("stopping")
        conn.request("GET", target, headers=self._headers)
        resp = conn.getresponse()
        if resp.status == 200:
            return resp
        self._close()
        if resp.status == 401:
            hint = "credentials rejected" if "Authorization" in self._headers else "no username configured"
            scheme = (resp.getheader("WWW-Authenticate", "") or "").split(" ", 1)[0] or "no scheme"
            raise HttpStatusError(f"HTTP 401 Unauthorized ({hint}; camera asks for {scheme} auth)")
        raise HttpStatusError(f"HTTP {resp.status} {resp.reason}")

    def _read_stream(self, resp: http.client.HTTPResponse, ctype: str) -> None:
        msg = Message()
        msg["Content-Type"] = ctype
        boundary = msg.get_param("boundary")
        reader = MultipartReader(resp, boundary if isinstance(boundary, str) else None, self._max_bytes)
        counted = 0
        try:
            while not self._stopping:
                part = reader.next_part()
                self._add_bytes(reader.bytes_in - counted)
                counted = reader.bytes_in
                if part.content_type and not part.content_type.lower().startswith("image/"):
                    continue  # some cameras interleave text parts (events, metadata)
                self._deliver(part.data, part.size)
        except StreamClosed:
            return
        finally:
            self._add_bytes(reader.bytes_in - counted)

    def _read_snapshot(self, resp: http.client.HTTPResponse) -> None:
        length = resp.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > self._max_bytes:
            self._deliver(None, int(length))
            return
        data = resp.read(self._max_bytes + 1)
        self._add_bytes(len(data))
        self._deliver(None if len(data) > self._max_bytes else data, len(data))

    def _deliver(self, data: bytes | None, size: int) -> None:
        if data is None:
            self._reject(f"frame of {size} bytes over max_frame_bytes={self._max_bytes}, dropped")
            return
        mono = self._admit()
        if mono is not None:
            self._push_jpeg(data, mono)

    def _close(self) -> None:
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.close()
