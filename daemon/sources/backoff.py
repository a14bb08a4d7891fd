"""Pure helpers for supervising a camera: capped exponential backoff with jitter, log thinning, an fps cap.

Nothing here sleeps or reads a clock: callers pass times in and wait themselves (interruptibly), so tests
drive these with plain numbers and an injected random source.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Delays between reconnects: ``initial_s * factor**n`` capped at ``max_s``, +-``jitter`` fraction.

    Call ``next_delay()`` after each failure and ``reset()`` only on real success (a frame received after the
    (re)connect), never on a mere TCP connect, so a camera that accepts and then drops keeps backing off.
    """

    def __init__(
        self,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        factor: float = 2.0,
        jitter: float = 0.2,
        rng: Callable[[], float] | None = None,
    ) -> None:
        if not initial_s > 0:
            raise ValueError(f"backoff initial_s must be > 0, got {initial_s}")
        if max_s < initial_s:
            raise ValueError(f"backoff max_s must be >= initial_s ({initial_s}), got {max_s}")
        if factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {factor}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        self._initial = initial_s
        self._max = max_s
        self._factor = factor
        self._jitter = jitter
        self._rng = rng if rng is not None else random.Random().random  # noqa: S311 - jitter, not crypto
        self._base = initial_s
        self._attempts = 0

    @property
    def attempts(self) -> int:
        """Failures since the last reset."""
        return self._attempts

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; advances the exponent."""
        base = self._base
        self._attempts += 1
        self._base = min(self._max, base * self._factor)
        spread = base * self._jitter * (2.0 * self._rng() - 1.0)
        return min(self._max, max(0.0, base + spread))

    def reset(self) -> None:
        self._base = self._initial
        self._attempts = 0


def log_worthy(n: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th... occurrence: a dead camera logs O(log n) lines, not one per retry."""
    return n >= 1 and n & (n - 1) == 0


class FpsCap:
    """Forwards at most ``max_fps`` frames per second on an even schedule; the rest are skipped.

    A fixed schedule (not "time since the last frame >= period") keeps a 25 fps camera capped at 10 fps at
    10 fps instead of 8.3. When frames stop for a while the schedule restarts instead of bursting.
    """

    def __init__(self, max_fps: float | None) -> None:
        if max_fps is not None and not max_fps > 0:
            raise ValueError(f"max_fps must be > 0 or None, got {max_fps}")
        self._period = 0.0 if max_fps is None else 1.0 / max_fps
        self._due: float | None = None

    @property
    def period(self) -> float:
        return self._period

    def admit(self, now: float) -> bool:
        """Whether a frame arriving at monotonic time ``now`` is forwarded."""
        if self._period <= 0:
            return True
        if self._due is None or now - self._due >= self._period:
            self._due = now + self._period
            return True
        # tolerate 2% early arrival: frame clocks jitter around the schedule
        if now >= self._due - 0.02 * self._period:
            self._due += self._period
            return True
        return False
