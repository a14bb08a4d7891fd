"""Liveness of the pipeline threads: each stage beats on every loop turn, even when idle."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Heartbeat:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._beats: dict[str, float] = {}

    def beat(self, stage: str) -> None:
        now = self._clock()
        with self._lock:
            self._beats[stage] = now

    def forget(self, stage: str) -> None:
        with self._lock:
            self._beats.pop(stage, None)

    def age(self) -> float:
        """Seconds since the stalest stage last beat (0 when no stage runs)."""
        now = self._clock()
        with self._lock:
            if not self._beats:
                return 0.0
            return max(now - t for t in self._beats.values())
