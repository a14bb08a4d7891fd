"""Bounded per-camera frame queues shared with the batcher: overload drops the oldest frame and counts it.

With an overflow sink (``set_overflow``; the cluster's workers hand overflow frames to an NVLink peer) the oldest
frame of a full queue is offered to the sink first: taken, it is counted as ``overflowed``; refused, it is dropped
and counted as ``dropped`` as before. The sink is called under the queues' (re-entrant) lock: it must not block; of the
queues it may only read ``last_taken``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from daemon.types import EndOfStream, Frame

Item = Frame | EndOfStream
log = logging.getLogger(__name__)


@dataclass(slots=True)
class QueueCounters:
    put: int = 0
    dropped: int = 0
    overflowed: int = 0  # frames handed to the overflow sink instead of being dropped


OverflowSink = Callable[[Frame], bool]  # True: the sink took the frame (it is processed elsewhere)


class FrameQueues:
    """One bounded deque per camera behind a single condition.

    ``put`` never blocks: when a camera's deque is full its oldest frame is dropped and counted.
    ``take`` returns up to ``max_items`` items taken round-robin across cameras, so one fast camera cannot
    starve the others inside a batch.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[str, deque[Item]] = {}
        self._sizes: dict[str, int] = {}
        self._counters: dict[str, QueueCounters] = {}
        self._order: list[str] = []
        self._next = 0
        self._released = False
        self._overflow: OverflowSink | None = None
        self._last_taken: dict[str, int] = {}  # camera -> seq of the last frame the batcher took

    def set_overflow(self, sink: OverflowSink | None) -> None:
        """From now on the oldest frame of a full queue goes to ``sink`` first (None: dropped, the default)."""
        with self._cond:
            self._overflow = sink

    def add_camera(self, camera: str, size: int) -> None:
        if size < 1:
            raise ValueError(f"queue size for camera {camera!r} must be >= 1, got {size}")
        with self._cond:
            if camera in self._queues:
                raise ValueError(f"camera {camera!r} already has a queue")
            self._queues[camera] = deque()
            self._sizes[camera] = size
            self._counters[camera] = QueueCounters()
            self._order.append(camera)

    def remove_camera(self, camera: str) -> None:
        with self._cond:
            self._queues.pop(camera, None)
            self._sizes.pop(camera, None)
            self._counters.pop(camera, None)
            self._last_taken.pop(camera, None)
            if camera in self._order:
                self._order.remove(camera)
            self._cond.notify_all()

    def put(self, item: Item) -> bool:
        """Queue an item; returns False when an older frame had to be dropped (or the camera is unknown)."""
        with self._cond:
            q = self._queues.get(item.camera)
            if q is None:
                return False
            counters = self._counters[item.camera]
            dropped = False
            if isinstance(item, Frame):
                while len(q) >= self._sizes[item.camera]:
                    idx = next((i for i, old in enumerate(q) if isinstance(old, Frame)), None)
                    if idx is None:
                        break
                    old = q[idx]
                    del q[idx]
                    if self._offer(old):
                        counters.overflowed += 1
                    else:
                        counters.dropped += 1
                        dropped = True
                counters.put += 1
            q.append(item)
            self._cond.notify()
            return not dropped

    def _offer(self, frame: Item) -> bool:
        sink = self._overflow
        if sink is None or not isinstance(frame, Frame):
            return False
        try:
            return bool(sink(frame))
        except Exception:
            log.exception("overflow sink failed on camera %s frame %d; the frame is dropped", frame.camera, frame.seq)
            return False

    def put_wait(self, item: Item, timeout: float = 60.0) -> bool:
        """Wait for room (as-fast-as-possible replays lose nothing), then put as ``put`` does.

        Gives up after ``timeout`` s, when the camera is removed, or once ``release_waiters`` was called (stop).
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while isinstance(item, Frame) and not self._released:
                q = self._queues.get(item.camera)
                if q is None or len(q) < self._sizes[item.camera]:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        return self.put(item)

    def take(self, max_items: int, timeout: float) -> list[Item]:
        """Wait up to ``timeout`` s for at least one item, then return up to ``max_items`` of what is queued."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(self._queues.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return []
                self._cond.wait(remaining)
            out: list[Item] = []
            while len(out) < max_items and self._order:
                progressed = False
                for _ in range(len(self._order)):
                    cam = self._order[self._next % len(self._order)]
                    self._next = (self._next + 1) % len(self._order)
                    q = self._queues[cam]
                    if q:
                        item = q.popleft()
                        if isinstance(item, Frame):
                            self._last_taken[cam] = item.seq
                        out.append(item)
                        self._cond.notify_all()
                        progressed = True
                        if len(out) >= max_items:
                            break
                if not progressed:
                    break
            return out

    def wait_nonempty(self, timeout: float) -> bool:
        with self._cond:
            if any(self._queues.values()):
                return True
            self._cond.wait(timeout)
            return any(self._queues.values())

    def counters(self, camera: str) -> QueueCounters:
        with self._cond:
            c = self._counters.get(camera, QueueCounters())
            return QueueCounters(c.put, c.dropped, c.overflowed)

    def last_taken(self, camera: str) -> int:
        """The seq of the camera's last frame taken for processing (-1: none yet): every frame of the camera up to
        it is in the pipeline or done, every later one still queued (or dropped, or overflowed)."""
        with self._cond:
            return self._last_taken.get(camera, -1)

    def depth(self, camera: str) -> int:
        with self._cond:
            return len(self._queues.get(camera, ()))

    def release_waiters(self) -> None:
        """From now on ``put_wait`` does not wait (the runtime is stopping)."""
        with self._cond:
            self._released = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
