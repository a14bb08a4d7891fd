"""A small real MJPEG camera for tests: a ThreadingHTTPServer on 127.0.0.1 serving JPEG frames.

    with MjpegServer(frames, fps=50) as cam:
        source = HttpMjpegSource("cam", cam.url, sink)

Options reproduce what real cameras do: parts with or without Content-Length, chunked transfer, garbage
between parts, a boundary with a leading "--" in the header, dropping each connection after K frames, basic
auth (401 otherwise), single-JPEG snapshot answers. ``stop()`` then ``start()`` brings the camera back on the
same port.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, owner: MjpegServer, port: int) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5.0  # a client that stops reading cannot block the server forever

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        owner = self.server.owner
        owner._enter()
        try:
            if not owner._authorized(self.headers.get("Authorization")):
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="camera"')
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif owner.snapshot:
                self._snapshot(owner)
            else:
                self._stream(owner)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        finally:
            owner._leave()

    def _snapshot(self, owner: MjpegServer) -> None:
        data = owner._next_frame()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, owner: MjpegServer) -> None:
        if owner.chunked:
            self.protocol_version = "HTTP/1.1"
        self.send_response(200)
        declared = owner.boundary if not owner.dashed_header else "--" + owner.boundary
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={declared}")
        self.send_header("Cache-Control", "no-cache")
        if owner.chunked:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        sent = 0
        while not owner._stopping.is_set():
            if owner.drop_after is not None and sent >= owner.drop_after:
                break
            self._write(owner, owner._part(owner._next_frame()))
            sent += 1
            owner._stopping.wait(1.0 / owner.fps)
        if owner.chunked and not owner._stopping.is_set():
            self._write(owner, b"")
        self.close_connection = True

    def _write(self, owner: MjpegServer, data: bytes) -> None:
        if owner.chunked:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.wfile.write(data)
        self.wfile.flush()


class MjpegServer:
    """A camera on 127.0.0.1 serving ``frames`` round-robin (see the module docstring for the options)."""

    def __init__(
        self,
        frames: Sequence[bytes],
        fps: float = 50.0,
        content_length: bool = True,
        drop_after: int | None = None,
        garbage: bytes = b"",
        auth: tuple[str, str] | None = None,
        snapshot: bool = False,
        chunked: bool = False,
        boundary: str = "deltayoloframe",
        dashed_header: bool = False,
        port: int = 0,
    ) -> None:
        if not frames:
            raise ValueError("MjpegServer needs at least one frame")
        self.frames = list(frames)
        self.fps = fps
        self.content_length = content_length
        self.drop_after = drop_after
        self.garbage = garbage
        self.auth = auth
        self.snapshot = snapshot
        self.chunked = chunked
        self.boundary = boundary
        self.dashed_header = dashed_header
        self.port = port
        self.frames_sent = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._active = threading.Condition(self._lock)
        self._handlers = 0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def start(self) -> MjpegServer:
        self._stopping.clear()
        server = _Server(self, self.port)
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="mjpeg-test-server",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every open stream and wait for the handlers (the camera is really gone)."""
        self._stopping.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        with self._active:
            self._active.wait_for(lambda: self._handlers == 0, timeout=5)

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- used by the handler ---------------------------------------------------------------------------------
    def _enter(self) -> None:
        with self._lock:
            self._handlers += 1
            self.requests += 1

    def _leave(self) -> None:
        with self._active:
            self._handlers -= 1
            self._active.notify_all()

    def _authorized(self, header: str | None) -> bool:
        if self.auth is None:
            return True
        expected = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode("ascii")
        return header == f"Basic {expected}"

    def _next_frame(self) -> bytes:
        with self._lock:
            data = self.frames[self.frames_sent % len(self.frames)]
            self.frames_sent += 1
        return data

    def _part(self, data: bytes) -> bytes:
        head = b"--" + self.boundary.encode() + b"\r\nContent-Type: image/jpeg\r\n"
        if self.content_length:
            head += b"Content-Length: %d\r\n" % len(data)
        return head + b"\r\n" + data + b"\r\n" + self.garbage
