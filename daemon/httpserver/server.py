"""The daemon's HTTP endpoint (loopback by default): /, /healthz, /metrics, /preview/{cam}, /snapshot/{cam}.

A ``ThreadingHTTPServer`` on its own thread; every request gets a thread. MJPEG streams are bounded in number,
end when the server stops, and notice a gone client at the latest when a frame (or the periodic re-send of the
last frame) is written. There is no authentication: bind to a non-loopback address only on a trusted
network.
"""

from __future__ import annotations

import html
import ipaddress
import json
import logging
import math
import select
import socket
import threading
import time
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.httpserver.metrics import StatsProvider, build_registry
from daemon.preview import PreviewFrame, PreviewHub

log = logging.getLogger(__name__)

BOUNDARY = "deltayoloframe"
WAIT_SLICE_S = 0.5
RESEND_S = 5.0


class CameraLiveness(Protocol):
    """One camera's liveness (``daemon.app.CameraHealth`` fits)."""

    @property
    def camera(self) -> str: ...

    @property
    def alive(self) -> bool: ...

    @property
    def last_frame_age_s(self) -> float | None: ...


class HealthReport(Protocol):
    """The pipeline's health at one moment (``daemon.app.RuntimeHealth`` fits)."""

    @property
    def ok(self) -> bool: ...

    @property
    def heartbeat_age_s(self) -> float: ...

    @property
    def cameras(self) -> Sequence[CameraLiveness]: ...


class HealthProvider(Protocol):
    """Where /healthz looks (``daemon.app.Runtime`` fits)."""

    def health(self) -> HealthReport: ...


def _seconds(value: float | None) -> float | None:
    """Rounded seconds; None for unknown or infinite (JSON has no Infinity)."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), 3)


def health_json(report: HealthReport) -> dict[str, object]:
    """The /healthz body."""
    return {
        "ok": bool(report.ok),
        "heartbeat_age_s": _seconds(report.heartbeat_age_s),
        "cameras": [
            {"camera": c.camera, "alive": bool(c.alive), "last_frame_age_s": _seconds(c.last_frame_age_s)}
            for c in report.cameras
        ],
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], app: HttpServer, family: socket.AddressFamily) -> None:
        self.address_family = family
        self.app = app
        super().__init__(addr, _Handler)


class HttpServer:
    """Serves health, metrics and previews until ``stop``."""

    def __init__(
        self,
        health: HealthProvider,
        stats: StatsProvider,
        previews: PreviewHub | None = None,
        host: str = "127.0.0.1",
        port: int = 8080,
        max_streams: int = 8,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"http port must be in [0, 65535], got {port!r}")
        if max_streams < 1:
            raise ValueError(f"http max_streams must be >= 1, got {max_streams!r}")
        self.health_provider = health
        self.previews = previews
        self.registry = build_registry(stats)
        self._host = host
        self._port = port
        self._max_streams = max_streams
        self._streams = 0
        self._lock = threading.Condition()
        self.stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and serve on a thread named ``http``; an OSError names the address when the bind fails."""
        if self._server is not None:
            raise RuntimeError("http server already started")
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        try:
            self._server = _Server((self._host, self._port), self, family)
        except OSError as exc:
            msg = f"http endpoint cannot bind {self._host}:{self._port}: {exc.strerror}"
            raise OSError(exc.errno, msg) from exc
        if not _is_loopback(self._host):
            log.warning("http endpoint listens on %s (not loopback) without authentication", self._host)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="http", daemon=True)
        self._thread.start()
        log.info("http endpoint on %s", self.url)

    @property
    def address(self) -> tuple[str, int]:
        if self._server is None:
            raise RuntimeError("http server not started")
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop accepting, end the streams, close the socket; True when all ended within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.stopping.set()
        if self._server is None:
            return True
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            while self._streams > 0 and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            clean = self._streams == 0
        return clean and not (self._thread is not None and self._thread.is_alive())

    # -- streams -----------------------------------------------------------------------------------------
    def acquire_stream(self) -> bool:
        with self._lock:
            if self._streams >= self._max_streams or self.stopping.is_set():
                return False
            self._streams += 1
            return True

    def release_stream(self) -> None:
        with self._lock:
            self._streams -= 1
            self._lock.notify_all()

    @property
    def active_streams(self) -> int:
        with self._lock:
            return self._streams

    def known_cameras(self) -> list[str]:
        """Cameras with a preview slot or in the health report."""
        names = set(self.previews.cameras()) if self.previews is not None else set()
        try:
            names.update(c.camera for c in self.health_provider.health().cameras)
        except Exception:
            log.exception("health provider failed while listing cameras")
        return sorted(names)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "deltayolo"

    def log_message(self, format: str, *args: object) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("http %s: %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        try:
            if path == "/":
                self._index()
            elif path == "/healthz":
                self._healthz()
            elif path == "/metrics":
                self._send(HTTPStatus.OK, CONTENT_TYPE_LATEST, generate_latest(self.server.app.registry))
            elif path.startswith("/preview/"):
                self._preview(path.removeprefix("/preview/"))
            elif path.startswith("/snapshot/"):
                self._snapshot(path.removeprefix("/snapshot/"))
            else:
                self._text(HTTPStatus.NOT_FOUND, f"no such page: {path}\n")
        except (BrokenPipeError, ConnectionResetError):
            log.debug("http client %s went away", self.address_string())
        except Exception:
            log.exception("http %s failed", path)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    # -- plain pages -------------------------------------------------------------------------------------
    def _send(self, status: HTTPStatus, ctype: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, "text/plain; charset=utf-8", text.encode())

    def _healthz(self) -> None:
        try:
            body = health_json(self.server.app.health_provider.health())
        except Exception as exc:
            log.exception("health provider failed")
            body = {"ok": False, "error": f"health check failed: {exc}"}
        status = HTTPStatus.OK if body["ok"] else HTTPStatus.SERVICE_UNAVAILABLE
        self._send(status, "application/json", json.dumps(body).encode())

    def _index(self) -> None:
        """Snapshot thumbnails (one request each, refreshed every 10 s) linking to the live streams.

        Not a live stream per camera: browsers open at most ~6 connections per host.
        """
        rows = []
        for cam in self.server.app.known_cameras():
            name, q = html.escape(cam), quote(cam, safe="")
            rows.append(f'<figure><figcaption><a href="/preview/{q}">{name}</a> (live)</figcaption>'
                        f'<a href="/preview/{q}"><img src="/snapshot/{q}" alt="{name}: no frame yet" '
                        'width="480"></a></figure>')
        body = ('<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">'
                "<title>deltayolo</title><style>body{font-family:sans-serif;background:#222;color:#eee}"
                "figure{display:inline-block}a{color:#9cf}</style></head><body><h1>deltayolo</h1>"
                '<p><a href="/healthz">/healthz</a> &middot; <a href="/metrics">/metrics</a></p>'
                + ("".join(rows) or "<p>no cameras</p>") + "</body></html>")
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", body.encode())

    # -- previews ----------------------------------------------------------------------------------------
    def _hub_for(self, camera: str) -> PreviewHub | None:
        app = self.server.app
        if app.previews is None:
            self._text(HTTPStatus.NOT_FOUND, "previews are disabled\n")
            return None
        if camera not in app.known_cameras():
            self._text(HTTPStatus.NOT_FOUND, f"no camera {camera!r}\n")
            return None
        return app.previews

    def _snapshot(self, camera: str) -> None:
        hub = self._hub_for(camera)
        if hub is None:
            return
        frame = hub.latest(camera)
        if frame is None:
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, f"camera {camera!r} has no preview frame yet\n")
            return
        self._send(HTTPStatus.OK, "image/jpeg", frame.jpeg)

    def _preview(self, camera: str) -> None:
        hub = self._hub_for(camera)
        if hub is None:
            return
        app = self.server.app
        if not app.acquire_stream():
            self._text(HTTPStatus.SERVICE_UNAVAILABLE, "too many preview streams\n")
            return
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-store")
            self.send_header("Connection", "close")
            self.end_headers()
            with hub.watch(camera):
                self._stream(hub, camera)
        finally:
            app.release_stream()
            self.close_connection = True

    def _stream(self, hub: PreviewHub, camera: str) -> None:
        app = self.server.app
        version, last_sent = 0, time.monotonic()
        last: PreviewFrame | None = None
        while not app.stopping.is_set() and not hub.closed and not self._client_gone():
            frame = hub.wait_next(camera, version, WAIT_SLICE_S)
            if frame is None:
                if camera not in hub.cameras():
                    return  # the camera was removed
                if last is None or time.monotonic() - last_sent < RESEND_S:
                    continue
                frame = last  # a re-send keeps the connection checked while the camera is quiet
            self._part(frame.jpeg)
            version, last, last_sent = frame.version, frame, time.monotonic()

    def _client_gone(self) -> bool:
        """A stream client sends nothing after its request: a readable socket means it hung up."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _part(self, jpeg: bytes) -> None:
        head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
        self.wfile.write(head + jpeg + b"\r\n")
        self.wfile.flush()


__all__ = ["CameraLiveness", "HealthProvider", "HealthReport", "HttpServer", "StatsProvider", "health_json"]
