"""A small sd_notify(3) client: tells systemd READY, STATUS, STOPPING, RELOADING and WATCHDOG.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for an abstract socket) to services with
``Type=notify``; each notification is one datagram of newline-separated ``KEY=VALUE`` lines. Without
``NOTIFY_SOCKET`` (a terminal, a test, a container) every call is a cheap no-op that returns False.
A failing send never raises: the daemon must not die because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 1.0


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in ``MONOTONIC_USEC``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def parse_notify_socket(value: str | None) -> str | None:
    """The address to send to: a path, or an abstract name with a leading NUL; None when unusable or unset."""
    if not value:
        return None
    if value.startswith("@"):
        if len(value) < 2:
            log.warning("NOTIFY_SOCKET=%r names an empty abstract socket; notifications disabled", value)
            return None
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is neither an absolute path nor an abstract '@' socket "
                "(vsock is not supported); notifications disabled", value)
    return None


def parse_watchdog_usec(environ: Mapping[str, str], pid: int) -> int | None:
    """WatchdogSec in microseconds when the watchdog is armed for this very process, else None.

    Mirrors sd_watchdog_enabled(3): ``WATCHDOG_PID``, when set, must name this process.
    """
    raw = environ.get("WATCHDOG_USEC")
    if not raw:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            log.warning("WATCHDOG_PID=%r is not a process id; watchdog disabled", owner)
            return None
    try:
        usec = int(raw)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; watchdog disabled", raw)
        return None
    if usec <= 0:
        log.warning("WATCHDOG_USEC=%r must be positive; watchdog disabled", raw)
        return None
    return usec


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


class SdNotifier:
    """Sends notifications to one address. Thread-safe; the socket is opened on the first send."""

    def __init__(
        self,
        address: str | None,
        watchdog_usec: int | None = None,
        clock_usec: Callable[[], int] = monotonic_usec,
    ) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._clock_usec = clock_usec
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failures = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> SdNotifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID (default: ``os.environ``, ``os.getpid()``)."""
        env = os.environ if environ is None else environ
        this_pid = os.getpid() if pid is None else pid
        return cls(parse_notify_socket(env.get("NOTIFY_SOCKET")), parse_watchdog_usec(env, this_pid))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_usec(self) -> int | None:
        """WatchdogSec in microseconds (None when systemd armed no watchdog for us)."""
        return self._watchdog_usec if self.enabled else None

    # -- the notifications ----------------------------------------------------------------------------------
    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *_status(status))

    def reloading(self, status: str | None = None) -> bool:
        """Start of a reload; send ``ready()`` when done. MONOTONIC_USEC lets systemd order the two."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={self._clock_usec()}", *_status(status))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time for the current start/stop/reload (e.g. a slow engine build)."""
        if seconds <= 0:
            raise ValueError(f"extend_timeout: seconds must be > 0, got {seconds!r}")
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def notify(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields as one datagram; True when it was sent."""
        for f in fields:
            if "=" not in f or "\n" in f:
                raise ValueError(f"sd_notify field must be one KEY=VALUE line, got {f!r}")
        if self._address is None or not fields:
            return False
        data = "\n".join(fields).encode("utf-8")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(data, self._address)
            except OSError as exc:
                self._failures += 1
                level = logging.WARNING if self._failures == 1 else logging.DEBUG
                log.log(level, "sd_notify to %r failed (%d so far): %s", self._address, self._failures, exc)
                return False
        return True

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _status(status: str | None) -> tuple[str, ...]:
    return () if status is None else (f"STATUS={_one_line(status)}",)


__all__ = ["SdNotifier", "monotonic_usec", "parse_notify_socket", "parse_watchdog_usec"]
