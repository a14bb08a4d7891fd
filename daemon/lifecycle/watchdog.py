"""Sends ``WATCHDOG=1`` every WatchdogSec/2, but only while the pipeline heartbeat is fresh.

A stuck pipeline (a hung decoder, a deadlocked GPU call) stops beating; the pings stop with it and systemd
kills and restarts the service after WatchdogSec. A live process with a dead pipeline
must not look healthy.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from daemon.lifecycle.sdnotify import SdNotifier

log = logging.getLogger(__name__)


class WatchdogNotifier(Protocol):
    """What the pinger needs from an sd_notify client (``SdNotifier`` fits)."""

    def watchdog(self) -> bool: ...

    def status(self, text: str) -> bool: ...


class WatchdogPinger:
    """A thread pinging systemd while ``heartbeat_age() <= max_age_s``.

    ``interval_s`` is WatchdogSec/2 (see ``interval_from_usec``). Keep ``max_age_s`` well below WatchdogSec so
    a stall is noticed before systemd's own deadline would pass anyway.
    """

    def __init__(
        self,
        notifier: WatchdogNotifier,
        heartbeat_age: Callable[[], float],
        max_age_s: float,
        interval_s: float,
        report_status: bool = True,
    ) -> None:
        if max_age_s <= 0:
            raise ValueError(f"watchdog max_age_s must be > 0, got {max_age_s!r}")
        if interval_s <= 0:
            raise ValueError(f"watchdog interval_s must be > 0, got {interval_s!r}")
        self._notifier = notifier
        self._heartbeat_age = heartbeat_age
        self._max_age_s = max_age_s
        self._interval_s = interval_s
        self._report_status = report_status
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True
        self.pings = 0

    @property
    def interval_s(self) -> float:
        return self._interval_s

    def check_once(self) -> bool:
        """One turn: ping if the heartbeat is fresh. Returns whether a ping was sent."""
        try:
            age = float(self._heartbeat_age())
        except Exception:
            log.exception("watchdog: heartbeat probe failed; withholding the ping")
            age = float("inf")
        healthy = age <= self._max_age_s
        if healthy != self._healthy:
            self._healthy = healthy
            self._on_change(healthy, age)
        if not healthy:
            return False
        if self._notifier.watchdog():
            self.pings += 1
        return True

    def _on_change(self, healthy: bool, age: float) -> None:
        if healthy:
            log.warning("watchdog: pipeline heartbeat fresh again (%.1f s); pings resumed", age)
            if self._report_status:
                self._notifier.status("pipeline recovered; watchdog pings resumed")
            return
        log.error("watchdog: pipeline heartbeat is %.1f s old (limit %.1f s); withholding WATCHDOG=1 so "
                  "systemd restarts the service", age, self._max_age_s)
        if self._report_status:
            self._notifier.status(
                f"pipeline stalled: heartbeat {age:.1f} s old (limit {self._max_age_s:.1f} s)")

    def _loop(self) -> None:
        while True:
            self.check_once()
            if self._stop.wait(self._interval_s):
                return

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("watchdog pinger already started")
        self._thread = threading.Thread(target=self._loop, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop pinging; True when the thread ended within ``timeout``."""
        self._stop.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


def interval_from_usec(watchdog_usec: int) -> float:
    """The ping period systemd recommends: half of WatchdogSec."""
    if watchdog_usec <= 0:
        raise ValueError(f"WATCHDOG_USEC must be > 0, got {watchdog_usec!r}")
    return watchdog_usec / 2_000_000


def default_max_age_s(watchdog_usec: int) -> float:
    """A heartbeat bound that leaves systemd time to act: half of WatchdogSec."""
    return interval_from_usec(watchdog_usec)


def pinger_for(
    notifier: SdNotifier, heartbeat_age: Callable[[], float], max_age_s: float | None = None
) -> WatchdogPinger | None:
    """A pinger at WatchdogSec/2 when systemd armed a watchdog for this process, else None."""
    usec = notifier.watchdog_usec
    if usec is None:
        return None
    bound = default_max_age_s(usec) if max_age_s is None else max_age_s
    return WatchdogPinger(notifier, heartbeat_age, bound, interval_from_usec(usec))


__all__ = ["WatchdogNotifier", "WatchdogPinger", "default_max_age_s", "interval_from_usec", "pinger_for"]
