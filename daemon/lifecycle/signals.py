"""SIGTERM/SIGINT set the one stop event; SIGHUP (``systemctl reload``) calls the reload callback.

Python runs signal handlers in the main thread between bytecodes, so ``install`` must be called there. The
reload callback runs inside the handler: keep it short (set an event, queue a request) and let a normal thread
do the work. Handlers never raise into the interrupted code; ``restore`` puts the previous handlers back.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None

STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP


class SignalHandlers:
    """Installs the daemon's handlers; usable as a context manager."""

    def __init__(self, stop: threading.Event, on_reload: Callable[[], None] | None = None) -> None:
        self._stop = stop
        self._on_reload = on_reload
        self._previous: dict[signal.Signals, _Handler] = {}
        self.stop_signals: list[str] = []
        self.reloads = 0

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread, not from "
                               f"{threading.current_thread().name!r}")
        if self._previous:
            raise RuntimeError("signal handlers already installed")
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle_stop)
        self._previous[RELOAD_SIGNAL] = signal.signal(RELOAD_SIGNAL, self._handle_reload)

    def restore(self) -> None:
        """Put back the handlers that were there before ``install`` (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be restored from the main thread")
        for sig, old in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if old is None else old)
        self._previous = {}

    def _handle_stop(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        self.stop_signals.append(name)
        if self._stop.is_set():
            log.warning("%s received while already stopping; the stop continues", name)
            return
        log.info("%s received: stopping", name)
        self._stop.set()

    def _handle_reload(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._on_reload is None:
            log.warning("%s received but this process has no reload; ignored", name)
            return
        if self._stop.is_set():
            log.warning("%s received while stopping; reload ignored", name)
            return
        self.reloads += 1
        log.info("%s received: reloading the config", name)
        try:
            self._on_reload()
        except Exception:
            log.exception("reload callback failed")

    def __enter__(self) -> SignalHandlers:
        self.install()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.restore()


__all__ = ["RELOAD_SIGNAL", "STOP_SIGNALS", "SignalHandlers"]
