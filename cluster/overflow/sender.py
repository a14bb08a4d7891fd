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

    def round_trip(self, seconds: float) -> None: ...

    def guest_frames(self, n: int) -> None: ...

    def guest_latency(self, seconds: float) -> None: ...

    def loan(self, side: str, route: str, n: int = 1) -> None: ...

    def fallback(self, side: str, reason: str, n: int = 1) -> None: ...


class PeerLink(Protocol):
    """The peer worker's ``guest_process`` (a DeploymentHandle call in Serve; a direct call in tests)."""

    name: str

    def call(self, batch: OverflowBatch, timeout_s: float) -> OverflowReply: ...


BREAKER_FAILURES = 3  # batches failed in a row (call failed, nothing came back in time) before offers are refused
BREAKER_OPEN_S = 5.0  # for this long; then one batch probes the peer (failed: refused again)


class OverflowSender:
    """The home side: the queues' overflow sink, a batching thread and the peer call (one batch in flight). A peer
    that keeps failing (``BREAKER_FAILURES`` batches in a row) gets no frames for ``BREAKER_OPEN_S``: its frames
    are dropped at once instead of holding the camera's later results until their deadline."""

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
        thread_init: Callable[[], None] | None = None,
    ) -> None:
        self._worker = worker
        self._thread_init = thread_init  # called first on the batching thread (its CUDA device: cluster.worker)
        self._failures = 0  # batches failed in a row
        self._open_until = 0.0  # offers refused until then (clock)
        self._last_taken = last_taken
        self._on_refused = on_refused
        self._s = settings
        self._gate = gate
        self._lend = lend
        self._camera_of = camera_of
        self._metrics = metrics
        self._clock = clock
        self._cond = threading.Condition()
        self._waiting: list[tuple[Frame, float, float]] = []  # frames, when they were offered, their deadline
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
        for f, _, _ in dropped:
            self._gate.give_up(f.camera, f.seq)

    # -- the queues' overflow sink (called under the queues' lock: never blocks) -----------------------------
    def offer(self, frame: Frame) -> bool:
        if frame.jpeg is None or self._stop.is_set():
            return False
        with self._cond:
            now = self._clock()
            if (self._peer is None or len(self._waiting) + self._in_flight >= self._s.max_pending
                    or now < self._open_until):
                self._counts["refused"] += 1
                self._metrics.overflow("refused")
                return False
            deadline = now + (self._s.max_wait_ms + self._s.timeout_ms) / 1000.0
            after = -1 if self._last_taken is None else self._last_taken(frame.camera)
            self._gate.expect(frame.camera, frame.seq, deadline, after)
            self._waiting.append((frame, now, deadline))
            self._cond.notify_all()
            return True

    # -- the batching thread --------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self._thread_init is not None:
            try:
                self._thread_init()
            except Exception:
                log.exception("%s: overflow thread set-up failed", self._worker)
        while not self._stop.is_set():
            self._gate.expire()
            batch = self._next_batch()
            if batch:
                frames = [f for f, _ in batch]
                ok = False
                try:
                    ok = self._send(frames, max(d for _, d in batch))
                except Exception:
                    log.exception("%s: overflow batch failed", self._worker)
                    self._settle_failed(frames)
                finally:
                    with self._cond:
                        self._in_flight = 0
                self._judge(ok)

    def _next_batch(self) -> list[tuple[Frame, float]]:
        """The next batch's frames still awaited and their deadlines ([] when stopping or none is waiting)."""
        wait = self._s.max_wait_ms / 1000.0
        with self._cond:
            while True:
                if self._stop.is_set():
                    return []  # stop() gives up what is still waiting
                if self._waiting:
                    age = self._clock() - self._waiting[0][1]
                    if len(self._waiting) >= self._s.max_batch or age >= wait or self._peer is None:
                        break
                    self._cond.wait(max(0.001, wait - age))
                else:
                    self._cond.wait(0.05)
                    return []
            taken = self._waiting[: self._s.max_batch]
            del self._waiting[: len(taken)]
            batch = [(f, d) for f, _, d in taken if self._gate.is_pending(f.camera, f.seq)]  # else given up already
            self._in_flight = len(batch)
            return batch

    def _judge(self, ok: bool) -> None:
        """Count a batch's outcome for the breaker: a failed one in a row too many refuses offers for a while."""
        with self._cond:
            self._failures = 0 if ok else self._failures + 1
            if self._failures >= BREAKER_FAILURES:
                self._open_until = self._clock() + BREAKER_OPEN_S
                if self._failures == BREAKER_FAILURES:
                    log.warning("%s: %d overflow batches in a row failed; overflow frames are dropped for %.0f s",
                                self._worker, self._failures, BREAKER_OPEN_S)

    def _send(self, frames: list[Frame], deadline: float) -> bool:
        """One batch to the peer, waiting at most until the frames' last deadline; False: nothing came back."""
        link = self._peer
        if link is None:
            self._settle_failed(frames)
            return False
        cams = sorted({f.camera for f in frames})
        configs = {c: self._camera_of(c) for c in cams}
        live = [f for f in frames if configs[f.camera] is not None]
        for f in frames:
            if configs[f.camera] is None:  # the camera left meanwhile
                self._gate.give_up(f.camera, f.seq)
        if not live:
            return True
        states = tuple(self._lend(c) for c in cams if configs[c] is not None)
        batch = OverflowBatch(self._worker, tuple(live), tuple(c for c in configs.values() if c is not None), states)
        self._count("sent", len(live))
        timeout = min(self._s.timeout_ms / 1000.0, deadline - self._clock())
        t0 = time.perf_counter()
        try:
            if timeout <= 0:
                raise TimeoutError("the frames' deadline passed before the batch left")
            reply = link.call(batch, timeout)
        except Exception as exc:
            log.warning("%s: overflow batch of %d frames to %s failed (%s: %s); they are dropped", self._worker,
                        len(live), link.name, type(exc).__name__, exc)
            self._settle_failed(live)
            return False
        took = time.perf_counter() - t0
        self._metrics.round_trip(took)
        with self._cond:
            self._round_trips.append(took)
        return self._take(live, reply) > 0

    def _take(self, frames: list[Frame], reply: OverflowReply) -> int:
        """Hand the reply's results to the gate; how many were published in time."""
        if reply.refused and self._on_refused is not None:
            self._on_refused(reply.refused)
        back: set[tuple[str, int]] = set()
        msgs: list[Message] = [*reply.results, *reply.errors]
        returned = 0
        for msg in msgs:
            back.add((msg.camera, msg.seq))
            if self._gate.deliver(msg):
                self._count("returned")
                returned += 1
            else:
                self._count("late")
        for f in frames:
            if (f.camera, f.seq) not in back and self._gate.give_up(f.camera, f.seq):
                self._count("failed")
        return returned

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
