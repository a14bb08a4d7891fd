"""The home side of overflow: the queues' overflow sink, batching, the peer call (see cluster.overflow)."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from cluster.config import OverflowSettings
from cluster.messages import OverflowBatch, OverflowReply
from cluster.overflow.gate import Message, OrderGate
from daemon.config.model import CameraConfig
from daemon.guest import BorrowedState
from daemon.types import Frame

log = logging.getLogger(__name__)


class OverflowMetrics(Protocol):
    def overflow(self, outcome: str, n: int = 1) -> None: ...

    def guest_latency(self, seconds: float, role: str = "home") -> None: ...


class PeerLink(Protocol):
    """The peer worker's ``guest_process`` (a DeploymentHandle call in Serve; a direct call in tests)."""

    name: str

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply: ...


class OverflowSender:
    """The home side: the queues' overflow sink, a batching thread and the peer call (one batch in flight)."""

    def __init__(
        self,
        worker: str,
        settings: OverflowSettings,
        gate: OrderGate,
        lend: Callable[[str], BorrowedState],
        camera_of: Callable[[str], CameraConfig | None],
        metrics: OverflowMetrics,
        clock: Callable[[], float] = time.monotonic,
        on_refused: Callable[[Sequence[str]], None] | None = None,
        last_taken: Callable[[str], int] | None = None,
    ) -> None:
        self._worker = worker
        self._last_taken = last_taken
        self._on_refused = on_refused
        self._s = settings
        self._gate = gate
        self._lend = lend
        self._camera_of = camera_of
        self._metrics = metrics
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[tuple[Frame, float]] = []  # frames and when they were offered
        self._in_flight = 0
        self._peer: PeerLink | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._counts = {"sent": 0, "returned": 0, "late": 0, "refused": 0, "failed": 0}
        self._round_trips: deque[float] = deque(maxlen=1000)  # seconds, the latest answered batches

    @property
    def peer(self) -> str | None:
        link = self._peer
        return None if link is None else link.name

    def set_peer(self, link: PeerLink | None) -> None:
        with self._cond:
            if (link is None) != (self._peer is None) or (link is not None and self._peer is not None
                                                           and link.name != self._peer.name):
                log.info("%s: overflow peer %s", self._worker, "none (overflow frames are dropped)" if link is None
                         else link.name)
            self._peer = link
            self._cond.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"overflow:{self._worker}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            dropped, self._waiting = self._waiting, []
        for f, _ in dropped:
            self._gate.give_up(f.camera, f.seq)

    # -- the queues' overflow sink (called under the queues' lock: never blocks) -----------------------------
    def offer(self, frame: Frame) -> bool:
        if frame.jpeg is None or self._stop.is_set():
            return False
        with self._cond:
            if self._peer is None or len(self._waiting) + self._in_flight >= self._s.max_pending:
                self._counts["refused"] += 1
                self._metrics.overflow("refused")
                return False
            now = self._clock()
            deadline = now + (self._s.max_wait_ms + self._s.timeout_ms) / 1000.0
            after = -1 if self._last_taken is None else self._last_taken(frame.camera)
            self._gate.expect(frame.camera, frame.seq, deadline, after)
            self._waiting.append((frame, now))
            self._cond.notify_all()
            return True

    # -- the batching thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            self._gate.expire()
            batch = self._next_batch()
            if batch:
                try:
                    self._send(batch)
                except Exception:
                    log.exception("%s: overflow batch failed", self._worker)
                    self._settle_failed(batch)

    def _next_batch(self) -> list[Frame]:
        wait = self._s.max_wait_ms / 1000.0
        with self._cond:
            while not self._stop.is_set():
                if self._waiting:
                    age = self._clock() - self._waiting[0][1]
                    if len(self._waiting) >= self._s.max_batch or age >= wait or self._peer is None:
                        break
                    self._cond.wait(max(0.001, wait - age))
                else:
                    self._cond.wait(0.05)
                    return []
            batch = [f for f, _ in self._waiting[: self._s.max_batch]]
            del self._waiting[: len(batch)]
            self._in_flight = len(batch)
            return batch

    def _send(self, frames: list[Frame]) -> None:
        link = self._peer
        try:
            if link is None:
                self._settle_failed(frames)
                return
            cams = sorted({f.camera for f in frames})
            configs = {c: self._camera_of(c) for c in cams}
            live = [f for f in frames if configs[f.camera] is not None]
            for f in frames:
                if configs[f.camera] is None:  # the camera left meanwhile
                    self._gate.give_up(f.camera, f.seq)
            if not live:
                return
            states = tuple(self._lend(c) for c in cams if configs[c] is not None)
            batch = OverflowBatch(self._worker, tuple(live),
                                  tuple(c for c in configs.values() if c is not None), states)
            self._count("sent", len(live))
            t0 = time.perf_counter()
            try:
                reply = link.call(batch, self._s.timeout_ms / 1000.0)
            except Exception as exc:
                log.warning("%s: overflow batch of %d frames to %s failed (%s: %s); they are dropped", self._worker,
                            len(live), link.name, type(exc).__name__, exc)
                self._settle_failed(live)
                return
            took = time.perf_counter() - t0
            self._metrics.guest_latency(took)
            with self._cond:
                self._round_trips.append(took)
            self._take(live, reply)
        finally:
            with self._cond:
                self._in_flight = 0

    def _take(self, frames: list[Frame], reply: OverflowReply) -> None:
        if reply.refused and self._on_refused is not None:
            self._on_refused(reply.refused)
        back: set[tuple[str, int]] = set()
        msgs: list[Message] = [*reply.results, *reply.errors]
        for msg in msgs:
            back.add((msg.camera, msg.seq))
            if self._gate.deliver(msg):
                self._count("returned")
            else:
                self._count("late")
        for f in frames:
            if (f.camera, f.seq) not in back and self._gate.give_up(f.camera, f.seq):
                self._count("failed")

    def _settle_failed(self, frames: Sequence[Frame]) -> None:
        for f in frames:
            if self._gate.give_up(f.camera, f.seq):
                self._count("failed")

    def _count(self, outcome: str, n: int = 1) -> None:
        with self._cond:
            self._counts[outcome] += n
        self._metrics.overflow(outcome, n)

    def counts(self) -> dict[str, int]:
        """Frames sent, returned (published), late (came back after they were given up), refused (no peer or
        too many pending: dropped at once), failed (the call failed or had no result for them), given_up (all
        frames handed over whose result was not published, failed and timed out alike)."""
        with self._cond:
            c = dict(self._counts)
        return {**c, "given_up": self._gate.given_up}

    def round_trip_ms(self) -> tuple[float, float]:
        """p50 and p99 of the latest answered batches' round trips (ms; 0 without any)."""
        with self._cond:
            rt = sorted(self._round_trips)
        if not rt:
            return 0.0, 0.0
        return rt[len(rt) // 2] * 1000.0, rt[min(len(rt) - 1, int(0.99 * len(rt)))] * 1000.0


__all__ = ["OverflowMetrics", "OverflowSender", "PeerLink"]
