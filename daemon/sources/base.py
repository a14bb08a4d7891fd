"""What every camera source shares: one named reader thread, a stop event, counters, the fps cap and the
reconnect supervisor (backoff reset only on a received frame, thinned logging, every exception caught)."""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import numpy as np
from numpy.typing import NDArray

from daemon.sources.backoff import Backoff, FpsCap, log_worthy
from daemon.types import EndOfStream, Frame, VideoPacket

log = logging.getLogger(__name__)

Sink = Callable[[Frame | EndOfStream], object]
SourceState = Literal["starting", "streaming", "reconnecting", "ended", "failed"]

REPEAT_LOG_S = 30.0  # the same failure message is repeated in the log at most this often
_SECRET_KEYS = ("pass", "pwd", "token", "secret", "auth", "key", "sig")


@dataclass(frozen=True, slots=True)
class SourceStats:
    """A consistent snapshot of one source's counters."""

    received: int  # frames read from the camera (forwarded + skipped_fps)
    skipped_fps: int  # frames not forwarded because of the fps cap
    errors: int  # failed connects/reads, rejected frames, decode errors
    reconnects: int  # connection attempts after a failure or a dropped stream
    bytes_in: int  # bytes read from the camera (wire bytes for HTTP, packet bytes for PyAV, file bytes)
    last_frame_mono: float | None  # time.monotonic() of the last frame read
    state: SourceState
    last_error: str  # "" until something fails; credentials are redacted


class SourceError(Exception):
    """A source cannot work at all (missing file, no frames...): the camera goes to state "failed"."""


def redact_url(url: str) -> str:
    """The URL without user info and with secret-looking query values masked, safe to log and publish."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    netloc = parts.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if any(s in k.lower() for s in _SECRET_KEYS) else v) for k, v in pairs], safe="*"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Source(ABC):
    """A camera reader. Subclasses implement ``_run`` and call ``_admit``/``_push_*`` per frame.

    ``start`` launches the thread ``capture:{camera}``; ``stop`` sets the stop event, calls ``_interrupt``
    (subclasses close sockets there so a blocked read returns) and joins. A source stopped by ``stop`` ends in
    state "ended" without pushing EndOfStream; a finite source that runs out pushes EndOfStream once; a source
    that cannot work pushes EndOfStream("failed: ...") once and ends in state "failed".
    """

    def __init__(
        self,
        camera: str,
        sink: Sink,
        max_fps: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if not camera:
            raise ValueError("camera id must be a non-empty string")
        self.camera = camera
        self._sink = sink
        self._cap = FpsCap(max_fps)
        self._backoff = backoff if backoff is not None else Backoff()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._seq = 0
        self._ended = False
        self._received = 0
        self._skipped = 0
        self._errors = 0
        self._reconnects = 0
        self._bytes_in = 0
        self._last_mono: float | None = None
        self._state: SourceState = "starting"
        self._last_error = ""
        self._logged_error = ""
        self._logged_at = -math.inf
        self._failure_logged = False
        self._rejects = 0
        self._sink_failures = 0

    # -- public ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"camera {self.camera!r}: source already started")
        self._thread = threading.Thread(target=self._main, name=f"capture:{self.camera}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the reader to stop without waiting for it (``stop`` waits)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self._interrupt()
        except Exception:
            log.exception("camera %s: interrupting the reader failed", self.camera)

    def stop(self, timeout: float) -> bool:
        """Ask the reader to stop and wait up to ``timeout`` s; True when the thread has ended."""
        self.request_stop()
        thread = self._thread
        if thread is None:
            return True
        thread.join(max(0.0, timeout))
        ended = not thread.is_alive()
        if not ended:
            log.warning("camera %s: reader thread did not stop within %.1f s", self.camera, timeout)
        return ended

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def stats(self) -> SourceStats:
        with self._lock:
            return SourceStats(
                received=self._received,
                skipped_fps=self._skipped,
                errors=self._errors,
                reconnects=self._reconnects,
                bytes_in=self._bytes_in,
                last_frame_mono=self._last_mono,
                state=self._state,
                last_error=self._last_error,
            )

    # -- for subclasses --------------------------------------------------------------------------------------
    @abstractmethod
    def _run(self) -> None:
        """Read until the stop event is set or the source ends; may raise (caught by ``_main``)."""

    def _interrupt(self) -> None:  # noqa: B027 - optional hook, most sources need nothing
        """Called from ``stop`` on the caller's thread: unblock a read (close a socket...)."""

    def _describe(self, exc: BaseException) -> str:
        """An error message safe to log and publish (subclasses scrub URLs and secrets)."""
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__

    @property
    def _stopping(self) -> bool:
        return self._stop.is_set()

    def _wait(self, seconds: float) -> bool:
        """Wait interruptibly; True when the source should keep going (no stop requested)."""
        if seconds > 0:
            return not self._stop.wait(seconds)
        return not self._stop.is_set()

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes_in += n

    def _admit(self) -> float | None:
        """Count a frame read from the camera; its monotonic time if it passes the fps cap, else None."""
        mono = time.monotonic()
        admitted = self._cap.admit(mono)
        with self._lock:
            self._received += 1
            self._last_mono = mono
            if not admitted:
                self._skipped += 1
            if self._state in ("starting", "reconnecting"):
                self._state = "streaming"
        if self._failure_logged:
            self._failure_logged = False
            log.info("camera %s: streaming again after %d failed attempts", self.camera, self._backoff.attempts)
        if self._backoff.attempts:
            self._backoff.reset()
        return mono if admitted else None

    def _push_jpeg(self, data: bytes, mono: float) -> None:
        self._push(Frame(self.camera, self._next_seq(), time.time(), mono, jpeg=data))

    def _push_pixels(self, pixels: NDArray[np.uint8], mono: float) -> None:
        self._push(Frame(self.camera, self._next_seq(), time.time(), mono, pixels=pixels))

    def _push_packet(self, packet: VideoPacket, mono: float) -> None:
        self._push(Frame(self.camera, self._next_seq(), time.time(), mono, packet=packet))

    def _reject(self, message: str) -> None:
        """A frame read but refused (too large...): counted, logged on the 1st, 2nd, 4th... occurrence."""
        with self._lock:
            self._errors += 1
            self._rejects += 1
            n = self._rejects
            self._last_error = message
        if log_worthy(n):
            log.warning("camera %s: %s [%d rejected so far]", self.camera, message, n)

    def _note_failure(self, message: str) -> None:
        """A connect/read failure: counted, state reconnecting, and logged thinly: a new message always; the
        same one again only on attempts 1, 2, 4, 8... and at most every REPEAT_LOG_S (flapping cameras)."""
        with self._lock:
            self._errors += 1
            self._last_error = message
            if self._state != "failed":
                self._state = "reconnecting"
        attempt = self._backoff.attempts + 1
        now = time.monotonic()
        if message != self._logged_error or (log_worthy(attempt) and now - self._logged_at >= REPEAT_LOG_S):
            self._logged_error = message
            self._logged_at = now
            self._failure_logged = True
            log.warning("camera %s: %s (attempt %d)", self.camera, message, attempt)
        else:
            log.debug("camera %s: %s (attempt %d)", self.camera, message, attempt)

    def _retry_wait(self) -> bool:
        """Back off before the next connect; False when stopped meanwhile."""
        delay = self._backoff.next_delay()
        log.debug("camera %s: reconnecting in %.2f s", self.camera, delay)
        if not self._wait(delay):
            return False
        with self._lock:
            self._reconnects += 1
        return True

    def _supervise(self, session: Callable[[], None], ended_message: str) -> None:
        """Run ``session`` (connect and read) again and again with backoff until stopped.

        ``session`` returns when the camera closed the stream, raises on errors, raises SourceError when the
        source can never work.
        """
        while not self._stopping:
            try:
                session()
                message = ended_message
            except SourceError as exc:
                self._fail(str(exc))
                return
            except Exception as exc:
                message = self._describe(exc)
            if self._stopping:
                return
            self._note_failure(message)
            if not self._retry_wait():
                return

    def _end(self, reason: str) -> None:
        """A finite source ran out: state ended, EndOfStream pushed once."""
        with self._lock:
            if self._state != "failed":
                self._state = "ended"
        log.info("camera %s: %s", self.camera, reason)
        self._push_end(reason)

    def _fail(self, message: str) -> None:
        """The source can never work: state failed, one error line, EndOfStream pushed once.

        ``last_error`` and the EndOfStream reason read "camera ID: message"."""
        text = f"camera {self.camera}: {message}"
        with self._lock:
            self._errors += 1
            self._state = "failed"
            self._last_error = text
        log.error("%s", text)
        self._push_end(f"failed: {text}")

    # -- internals -------------------------------------------------------------------------------------------
    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        return seq

    def _push(self, item: Frame | EndOfStream) -> None:
        try:
            self._sink(item)
        except Exception:
            with self._lock:
                self._errors += 1
                self._sink_failures += 1
                n = self._sink_failures
            if log_worthy(n):
                log.exception("camera %s: frame sink failed [%d so far]", self.camera, n)

    def _push_end(self, reason: str) -> None:
        if self._ended:
            return
        self._ended = True
        self._push(EndOfStream(self.camera, reason))

    def _main(self) -> None:
        try:
            self._run()
        except Exception as exc:
            log.exception("camera %s: reader crashed", self.camera)
            self._fail(f"reader crashed: {self._describe(exc)}")
        finally:
            with self._lock:
                if self._state not in ("failed", "ended"):
                    self._state = "ended"
