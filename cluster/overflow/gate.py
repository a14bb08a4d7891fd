"""The order gate: a camera's results go out in frame order across the frames handed to the overflow peer
(see cluster.overflow)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from daemon.publish import Publisher
from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

log = logging.getLogger(__name__)

Message = FrameResult | FrameError


@dataclass
class _Camera:
    pending: dict[int, float] = field(default_factory=dict)  # frame seq -> deadline (monotonic)
    after: dict[int, tuple[int, float]] = field(default_factory=dict)  # seq -> (home frame it waits for, deadline)
    held: list[Message] = field(default_factory=list)  # later results waiting for the pending ones, seq order


class OrderGate:
    """A Publisher in front of the numbering: results of a camera go out in frame-seq order across pending overflow
    frames (see the module doc). Thread-safe. The gate's lock guards only its books: messages ready to go are queued
    under it in their final order and published by one thread at a time outside it (``_drain``), so ``expect`` (the
    queues' overflow sink, under the frame queues' lock) never waits for the inner publisher's I/O."""

    def __init__(self, inner: Publisher, clock: Callable[[], float] = time.monotonic) -> None:
        self._inner = inner
        self._clock = clock
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._cams: dict[str, _Camera] = {}
        self.late = 0  # results that came back after their frame was given up (discarded)
        self._given: dict[str, int] = {}  # camera -> pending frames whose result never came back (lost: dropped)
        self._home_seen: dict[str, int] = {}  # camera -> highest frame seq of the home's own results and errors
        self._outbox: deque[Message] = deque()  # ready to publish, in order (appended under _lock)
        self._emit_lock = threading.Lock()  # held by the one thread publishing the outbox

    def home_seen(self, camera: str) -> int:
        """The highest frame seq of the camera's own (home) results and errors so far (-1: none)."""
        with self._lock:
            return self._home_seen.get(camera, -1)

    def is_pending(self, camera: str, seq: int) -> bool:
        """Whether frame ``seq`` of ``camera`` is still awaited (not come back, not given up, deadline not past)."""
        with self._lock:
            cam = self._cams.get(camera)
            deadline = None if cam is None else cam.pending.get(seq)
            return deadline is not None and deadline > self._clock()

    def forget(self, cameras: Sequence[str]) -> None:
        """The cameras left this worker (after their fence) or start anew on it: their books are dropped (what is
        still held is given up) and their next source numbers frames from 0 again."""
        with self._lock:
            for c in cameras:
                cam = self._cams.pop(c, None)
                self._home_seen.pop(c, None)
                if cam is not None:
                    self._give(c, len(cam.pending) + len(cam.held))

    @property
    def given_up(self) -> int:
        with self._lock:
            return sum(self._given.values())

    def given_up_of(self, camera: str) -> int:
        with self._lock:
            return self._given.get(camera, 0)

    def _give(self, camera: str, n: int) -> None:
        if n:
            self._given[camera] = self._given.get(camera, 0) + n

    # -- overflow side --------------------------------------------------------------------------------------
    def expect(self, camera: str, seq: int, deadline: float, after: int = -1) -> None:
        """Frame ``seq`` of ``camera`` went to the peer: later results of the camera wait for it; its own result
        waits for the home's result of frame ``after`` (the last the home took before), or its deadline."""
        with self._lock:
            cam = self._cams.setdefault(camera, _Camera())
            cam.pending[seq] = deadline
            if after > self._home_seen.get(camera, -1):
                cam.after[seq] = (after, deadline)

    def deliver(self, result: Message) -> bool:
        """A pending frame's result (or error) came back: False when it was not pending (late: discarded)."""
        with self._lock:
            cam = self._cams.get(result.camera)
            deadline = None if cam is None else cam.pending.pop(result.seq, None)
            if cam is None or deadline is None or deadline <= self._clock():
                self.late += 1
                if cam is not None and deadline is not None:  # past its deadline: given up like an expired frame
                    cam.after.pop(result.seq, None)
                    self._give(result.camera, 1)
                    self._flush(result.camera, cam)
                late = True
            else:
                late = False
                _insert(cam.held, result)
                self._flush(result.camera, cam)
        self._drain()
        return not late

    def give_up(self, camera: str, seq: int) -> bool:
        """A pending frame will not come back (peer failed, no result): False when it was not pending."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None or cam.pending.pop(seq, None) is None:
                return False
            self._give(camera, 1)
            self._flush(camera, cam)
        self._drain()
        return True

    def expire(self, now: float | None = None) -> int:
        """Give up every pending frame past its deadline; how many."""
        with self._lock:
            n = self._expire_locked(self._clock() if now is None else now)
        self._drain()
        return n

    def _expire_locked(self, t: float) -> int:
        n = 0
        for camera, cam in list(self._cams.items()):
            late = [s for s, d in cam.pending.items() if d <= t]
            for s in late:
                del cam.pending[s]
                cam.after.pop(s, None)
            n += len(late)
            if late:
                self._give(camera, len(late))
            waited = [s for s, (_, d) in cam.after.items() if d <= t and s not in cam.pending]
            for s in waited:  # back in time, but the home's earlier frames never came: it goes out anyway
                del cam.after[s]
            if late or waited:
                self._flush(camera, cam)
        return n

    def pending(self, camera: str | None = None) -> int:
        with self._lock:
            cams = self._cams.values() if camera is None else [self._cams.get(camera, _Camera())]
            return sum(len(c.pending) for c in cams)

    def settle(self, cameras: Sequence[str], timeout_s: float) -> bool:
        """A camera being released: wait (at most ``timeout_s``) until it has nothing pending nor held (its
        returned results go out after the home's frames taken before them, before its numbering is fenced), then
        give up the frames still pending. A returned result still waiting for a home frame stays held (it goes out
        when that frame's result comes, or at its deadline): it never overtakes the home's frames. Everything
        ready is published when this returns. False: something was given up or is still held."""
        deadline = time.monotonic() + timeout_s
        with self._settled:
            while True:
                self._expire_locked(self._clock())
                if not any(self._busy(c) for c in cameras):
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._settled.wait(min(left, 0.05))
            clean = True
            for c in cameras:
                cam = self._cams.get(c)
                if cam is not None:
                    clean &= not cam.pending and not cam.held
                    self._give(c, len(cam.pending))
                    for seq in cam.pending:
                        cam.after.pop(seq, None)
                    cam.pending.clear()
                    self._flush(c, cam)
        self._drain(wait=True)
        return clean

    def _busy(self, camera: str) -> bool:
        cam = self._cams.get(camera)
        return cam is not None and bool(cam.pending or cam.held)

    # -- Publisher ------------------------------------------------------------------------------------------
    def publish_result(self, result: FrameResult) -> None:
        self._publish(result)

    def publish_error(self, err: FrameError) -> None:
        self._publish(err)

    def publish_stats(self, stats: NodeStats) -> None:
        self._inner.publish_stats(stats)

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        self._inner.publish_camera_state(camera, state, detail)

    def close(self, timeout: float) -> None:
        with self._lock:
            for camera, cam in list(self._cams.items()):  # stopping: what is held goes out, pending frames are lost
                self._give(camera, len(cam.pending))
                cam.pending.clear()
                cam.after.clear()
                self._flush(camera, cam)
        self._drain(wait=True)
        self._inner.close(timeout)

    def _publish(self, msg: Message) -> None:
        with self._lock:
            self._expire_locked(self._clock())  # deadlines hold while the overflow thread waits on a silent peer
            if msg.seq > self._home_seen.get(msg.camera, -1):
                self._home_seen[msg.camera] = msg.seq
            cam = self._cams.get(msg.camera)
            if cam is None or not (cam.pending or cam.held):
                self._outbox.append(msg)
            else:
                _insert(cam.held, msg)
                self._flush(msg.camera, cam)
        self._drain()

    def _flush(self, camera: str, cam: _Camera) -> None:
        """Under the lock: queue held messages below the lowest pending seq for publishing, in seq order; a
        returned result only once the home's frames taken before it were published."""
        low = min(cam.pending, default=None)
        seen = self._home_seen.get(camera, -1)
        while cam.held and (low is None or cam.held[0].seq < low):
            wait = cam.after.get(cam.held[0].seq)
            if wait is not None and wait[0] > seen:
                break
            cam.after.pop(cam.held[0].seq, None)
            self._outbox.append(cam.held.pop(0))
        if not cam.pending and not cam.held:
            self._cams.pop(camera, None)
        self._settled.notify_all()

    def _drain(self, wait: bool = False) -> None:
        """Publish the outbox in order, outside the books' lock, one thread at a time. A thread that finds another
        publishing leaves its messages to it (``wait``: waits for it, then publishes what is left): the publishing
        thread looks again after letting go, so nothing stays behind."""
        while True:
            if not self._emit_lock.acquire(blocking=wait):
                return
            try:
                while True:
                    with self._lock:
                        if not self._outbox:
                            break
                        msg = self._outbox.popleft()
                    self._emit(msg)
            finally:
                self._emit_lock.release()
            with self._lock:
                if not self._outbox:
                    return

    def _emit(self, msg: Message) -> None:
        try:
            if isinstance(msg, FrameResult):
                self._inner.publish_result(msg)
            else:
                self._inner.publish_error(msg)
        except Exception:
            log.exception("publishing camera %s frame %d failed", msg.camera, msg.seq)


def _insert(held: list[Message], msg: Message) -> None:
    i = len(held)
    while i > 0 and held[i - 1].seq > msg.seq:
        i -= 1
    held.insert(i, msg)


__all__ = ["Message", "OrderGate"]
