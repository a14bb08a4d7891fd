"""Message sequence numbers that survive camera moves: leases from the coordinator.

In cluster mode the ``seq`` of a camera's detection and frame-error messages counts that camera's *published
messages* (frames dropped by a full queue are counted in stats, not in ``seq``), over the whole life of the camera
in the cluster, whichever worker runs it:

* The coordinator leases each camera's numbers to its worker in aligned blocks of ``R`` (``seq_lease``): a lease
  is ``[start, ceiling)``; the worker numbers messages ``start, start+1, ...`` and the coordinator raises the
  ceiling by ``R`` (in its health polls) once half of the lease is used. A camera's first lease starts at
  ``R * unix seconds`` of the coordinator's clock, so numbers also keep rising across restarts of the whole
  cluster (a restart is a jump to a multiple of ``R`` like a fail-over).
* **Graceful move** (rebalance, a GPU added): the old worker stops the camera and returns the exact next number;
  the new worker continues from it under the same ceiling. The stream is contiguous.
* **Fail-over** (the worker died): what the dead worker published after the last poll is unknown, but it never
  went past its ceiling; the new worker starts at that ceiling (a multiple of ``R``) with a fresh lease. The
  stream jumps forward to a multiple of ``R``: that jump marks a fail-over, it is not a loss. Messages the dead
  worker published are all below the jump, so numbers never repeat.
* A worker that was declared dead but was not (a partition) keeps numbering below its old ceiling until it is
  told to release the camera; numbers still never repeat.

A consumer therefore sees strictly increasing numbers per camera; a gap that ends at a multiple of ``R`` is a
fail-over or a restart, any other gap is a lost message. (Assumes the coordinator's wall clock does not step back
across a restart, and fewer than ``R`` messages per second per camera.) A coordinator that restarts while the
workers run adopts their leases from its first polls. Results that finish after their camera was released are discarded
and counted (``fenced``): the camera's new owner numbers from the handed-over value.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from daemon.publish import Publisher
from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Lease:
    """Numbers ``[start, ceiling)`` of one camera granted to one worker."""

    camera: str
    start: int
    ceiling: int


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A worker's view of one camera's numbering: the next number to use and the current ceiling."""

    camera: str
    next_seq: int
    ceiling: int


class SeqBook:
    """Worker side: hands out the next number per camera; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}
        self._ceiling: dict[str, int] = {}
        self.fenced = 0  # results discarded because their camera was released
        self.overruns = 0  # numbers used past the ceiling (the coordinator stopped extending leases)

    def grant(self, lease: Lease) -> None:
        if lease.ceiling <= lease.start:
            raise ValueError(f"camera {lease.camera!r}: lease ceiling {lease.ceiling} <= start {lease.start}")
        with self._lock:
            self._next[lease.camera] = lease.start
            self._ceiling[lease.camera] = lease.ceiling

    def extend(self, camera: str, ceiling: int) -> None:
        """Raise a camera's ceiling (never lowers it; unknown cameras are ignored)."""
        with self._lock:
            if camera in self._ceiling and ceiling > self._ceiling[camera]:
                self._ceiling[camera] = ceiling

    def take(self, camera: str) -> int | None:
        """The number for the camera's next message, or None when the camera is not (any more) ours."""
        with self._lock:
            n = self._next.get(camera)
            if n is None:
                self.fenced += 1
                return None
            self._next[camera] = n + 1
            over = n >= self._ceiling[camera]
            if over:
                self.overruns += 1
        if over:
            log.warning("camera %s: message seq %d is past its lease ceiling (coordinator unreachable?)", camera, n)
        return n

    def fence(self, camera: str) -> LeaseState | None:
        """Stop numbering the camera; its state for the hand-over (None when unknown)."""
        with self._lock:
            n = self._next.pop(camera, None)
            c = self._ceiling.pop(camera, None)
        return None if n is None or c is None else LeaseState(camera, n, c)

    def states(self) -> tuple[LeaseState, ...]:
        with self._lock:
            return tuple(LeaseState(c, n, self._ceiling[c]) for c, n in sorted(self._next.items()))


class SequencedPublisher:
    """A Publisher that renumbers detection and frame-error messages from the SeqBook, then fans out."""

    def __init__(self, inner: Sequence[Publisher], book: SeqBook) -> None:
        self._inner = list(inner)
        self._book = book

    def publish_result(self, result: FrameResult) -> None:
        seq = self._book.take(result.camera)
        if seq is None:
            return
        numbered = dataclasses.replace(result, seq=seq)
        for pub in self._inner:
            _guarded(pub.publish_result, numbered)

    def publish_error(self, err: FrameError) -> None:
        seq = self._book.take(err.camera)
        if seq is None:
            return
        numbered = dataclasses.replace(err, seq=seq)
        for pub in self._inner:
            _guarded(pub.publish_error, numbered)

    def publish_stats(self, stats: NodeStats) -> None:
        for pub in self._inner:
            _guarded(pub.publish_stats, stats)

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        for pub in self._inner:
            _guarded(pub.publish_camera_state, camera, state, detail)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for pub in self._inner:
            try:
                pub.close(max(0.1, deadline - time.monotonic()))
            except Exception:
                log.exception("closing publisher %r failed", pub)


def _guarded(fn: object, *args: object) -> None:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception:
        log.exception("publisher %r failed", getattr(fn, "__qualname__", fn))


class LeaseLedger:
    """Coordinator side: the ceiling granted per camera, and the leases for assignments and moves."""

    def __init__(self, block: int) -> None:
        if block < 2:
            raise ValueError(f"seq lease block must be >= 2, got {block}")
        self.block = block
        self._ceiling: dict[str, int] = {}

    def ceiling(self, camera: str) -> int | None:
        return self._ceiling.get(camera)

    def first(self, camera: str, start: int = 0) -> Lease:
        """A camera's first lease from ``start`` (aligned up to the block; see ``first_start``)."""
        start = self._align_up(start)
        lease = Lease(camera, start, start + self.block)
        self._ceiling[camera] = lease.ceiling
        return lease

    def graceful(self, state: LeaseState) -> Lease:
        """A move whose old owner handed over its exact next number."""
        ceiling = max(state.ceiling, self._ceiling.get(state.camera, 0))
        if ceiling <= state.next_seq:
            ceiling = self._align_up(state.next_seq + 1) + self.block
        self._ceiling[state.camera] = ceiling
        return Lease(state.camera, state.next_seq, ceiling)

    def failover(self, camera: str) -> Lease:
        """A move away from a dead worker: start at its ceiling, a fresh block."""
        start = self._ceiling.get(camera)
        if start is None:
            raise KeyError(f"camera {camera!r} has no lease to fail over from")
        return self.first(camera, start)

    def adopt(self, state: LeaseState) -> None:
        """Learn a running worker's lease (a coordinator that restarted rebuilds its ledger from polls)."""
        self._ceiling[state.camera] = max(state.ceiling, self._ceiling.get(state.camera, 0))

    def extension(self, state: LeaseState) -> int | None:
        """A raised ceiling when the worker used half of its lease, else None."""
        ceiling = max(state.ceiling, self._ceiling.get(state.camera, 0))
        if state.next_seq + self.block // 2 < ceiling:
            if ceiling > state.ceiling:
                return ceiling  # granted earlier, the worker has not seen it yet
            return None
        ceiling = self._align_up(max(ceiling, state.next_seq)) + self.block
        self._ceiling[state.camera] = ceiling
        return ceiling

    def first_start(self, now_s: float) -> int:
        """Where a camera the coordinator knows nothing about starts: ``R * unix seconds``. That is above any
        number an earlier run can have used (it would have taken R messages per second), so numbers keep rising
        across restarts of the whole cluster and of the coordinator too."""
        return self.block * int(now_s)

    def _align_up(self, n: int) -> int:
        return -(-n // self.block) * self.block


__all__ = ["Lease", "LeaseLedger", "LeaseState", "SeqBook", "SequencedPublisher"]
