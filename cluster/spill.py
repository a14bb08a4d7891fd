"""Spill-over bookkeeping for the coordinator: each worker's drop share over windows, and which groups were
spilled when. The decisions themselves are pure (``cluster.placement.spill_moves`` and ``spill_may_return``);
the coordinator makes the graceful moves.

A GPU whose runtime drops more than ``spill_drop_fraction`` of its frames (per-camera queue drops, from its status)
over a window of ``spill_window_s`` hands its lightest group (configured load) to an NVLink peer that drops
(almost) nothing; the group comes back once it stayed ``spill_hold_s`` on the peer and the home dropped at most
``spill_return`` over a whole window measured after the spill (hysteresis: the two bounds differ, and the hold
bounds how often a group can go back and forth).

Spill cycles: under steady overload a home can saturate again as soon as its group is back, and the group would
bounce every ``spill_hold_s``. A re-spill of a group within ``spill_cycle_window_s`` of its return is a cycle: it
doubles the group's hold (``spill_hold_s`` times 2, 4, ... up to ``spill_backoff_max``); the factor halves again
for every ``spill_calm_s`` the group then stays home (``cluster.placement.spill_backoff``). The coordinator logs
and counts each cycle (``deltayolo_spill_cycles_total``).

Overflow batches (``workers.overflow``, cluster/overflow.py) come first: frames a worker hands to its NVLink peer
are not drops (the queues count them as ``overflowed``), only frames overflow could not place are (refused, or
given up when their result did not come back). So with overflow on, a group spills only when its GPU keeps
dropping although its peer takes overflow batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cluster.config import CoordinatorSettings
from cluster.messages import CameraStatus
from cluster.placement import drop_pressure, spill_backoff, spill_may_return, spill_moves


@dataclass
class _Window:
    start: float | None = None  # when the current window began (None: not yet)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # (processed, dropped) per camera then
    pressure: float = 0.0  # the drop share over the last complete window
    at: float | None = None  # when that window ended


@dataclass(frozen=True, slots=True)
class SpillCycle:
    """A group spilled again soon after it came home: how soon, and its hold factor from now on."""

    group: str
    home_s: float  # how long it stayed home
    factor: int  # its hold is factor * spill_hold_s
    count: int  # the group's cycles so far


class SpillBook:
    """Drop-share windows per worker and spilled groups. Not thread-safe (the coordinator's loop)."""

    def __init__(self, settings: CoordinatorSettings) -> None:
        self._s = settings
        self._windows: dict[str, _Window] = {}
        self._spilled: dict[str, float] = {}  # group -> when it was spilled to a peer
        self._factor: dict[str, int] = {}  # group -> its hold factor (backoff), from its last spill
        self._returned: dict[str, float] = {}  # group -> when it last came home from a spill
        self._cycles: dict[str, int] = {}  # group -> spill cycles so far

    @property
    def enabled(self) -> bool:
        return self._s.spill_drop_fraction is not None

    def observe(self, worker: str, cameras: Sequence[CameraStatus], now: float) -> None:
        """A fresh status of a live worker: close its window when ``spill_window_s`` passed."""
        w = self._windows.setdefault(worker, _Window())
        counts = {c.camera: (c.processed, c.dropped) for c in cameras}
        if w.start is None:
            w.start, w.counts = now, counts
        elif now - w.start >= self._s.spill_window_s:
            w.pressure, w.at = drop_pressure(w.counts, counts), now
            w.start, w.counts = now, counts

    def pressure(self, worker: str) -> float:
        w = self._windows.get(worker)
        return 0.0 if w is None else w.pressure

    def moves(self, live: Sequence[str], held: Mapping[str, Mapping[str, float]],
              peers: Mapping[str, Sequence[str]]) -> list[tuple[str, str, str]]:
        """(group, source, target) spills for this step, among live workers with a window started."""
        limit = self._s.spill_drop_fraction
        if limit is None:
            return []
        measured = {n: self._windows[n].pressure for n in live if n in self._windows
                    and self._windows[n].start is not None}
        if len(measured) < 2:
            return []
        return spill_moves(measured, held, {n: peers.get(n, ()) for n in measured}, limit, min(limit / 5.0, 0.01))

    def spilled(self, group: str, source: str, target: str, now: float) -> SpillCycle | None:
        """Record a spill; a SpillCycle when it came soon after the group's last return (its hold doubled)."""
        s = self._s
        factor, cycled = spill_backoff(self._factor.get(group, 1), self._returned.get(group), now,
                                       s.spill_cycle_window_s, s.spill_calm_s, s.spill_backoff_max)
        self._factor[group] = factor
        self._spilled[group] = now
        self._reset(source, target)  # judge both again on a fresh window
        if not cycled:
            return None
        self._cycles[group] = self._cycles.get(group, 0) + 1
        return SpillCycle(group, now - self._returned[group], factor, self._cycles[group])

    def spilled_at(self, group: str) -> float | None:
        return self._spilled.get(group)

    def hold_factor(self, group: str) -> int:
        """The group's backoff: its hold as a multiple of ``spill_hold_s`` (from its last spill)."""
        return self._factor.get(group, 1)

    def hold_s(self, group: str) -> float:
        """How long the group stays on the peer at least: ``spill_hold_s`` times its backoff factor."""
        return self._s.spill_hold_s * self.hold_factor(group)

    def cycles(self, group: str | None = None) -> int:
        """Spill cycles of ``group`` (None: of all groups)."""
        return sum(self._cycles.values()) if group is None else self._cycles.get(group, 0)

    def may_return(self, group: str, home: str, now: float) -> bool:
        at = self._spilled.get(group)
        w = self._windows.get(home)
        if at is None or w is None:
            return at is None
        return spill_may_return(at, now, self.hold_s(group), w.pressure, w.at, self._s.spill_return)

    def returned(self, group: str, home: str, now: float) -> None:
        self._spilled.pop(group, None)
        self._returned[group] = now
        self._reset(home)

    def forget(self, group: str) -> None:
        """The group is home again by other means (a fail-over, a manual move); its backoff stays."""
        self._spilled.pop(group, None)

    def _reset(self, *workers: str) -> None:
        for n in workers:
            self._windows[n] = _Window()


__all__ = ["SpillBook", "SpillCycle"]
