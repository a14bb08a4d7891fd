"""Per-replica metrics through ``ray.util.metrics`` (shown on the Ray dashboard and its Prometheus endpoint).

``WorkerMetrics`` is a Publisher: it sees every published result and stats record of its worker and turns them
into metrics tagged with the worker name:

- ``deltayolo_frames_total{worker,camera}`` published frame results
- ``deltayolo_delta_decisions_total{worker,decision}`` full / regions / skip
- ``deltayolo_bytes_saved_total{worker}`` decoded pixel bytes that did not go through inference
  (``bytes_decoded * (1 - inferred_fraction)`` per frame)
- ``deltayolo_latency_ms{worker}`` capture -> publish histogram, ``deltayolo_latency_p50_ms`` / ``_p99_ms`` gauges
- ``deltayolo_fps{worker}`` processed frames per second over the last stats interval
- ``deltayolo_cache_moves_total{worker,kind}`` cameras moved in, warm (caches imported) or cold (keyframe)
- ``deltayolo_cache_move_bytes_total{worker,phase}`` camera-state bytes exported / imported
- ``deltayolo_cache_move_ms{worker,phase}`` time to export / import / checkpoint one camera's state (histogram)
- ``deltayolo_failovers_total{worker,kind}`` cameras taken over from a dead worker, warm (from a checkpoint) or
  cold (forced keyframe); ``deltayolo_failover_checkpoint_age_ms{worker}`` the age of the checkpoints used
- ``deltayolo_overflow_frames_total{worker,outcome}`` overflow frames (cluster.overflow): as a home ``sent`` to
  the peer, ``returned`` (published), ``late`` (came back after they were given up: discarded), ``refused`` (no
  peer, too many pending or the peer failing: dropped at once), ``failed`` (the call failed or had no result:
  dropped); ``deltayolo_overflow_guest_frames_total{worker}`` frames this worker processed as another's guest
- ``deltayolo_overflow_loans_total{worker,side,route}`` camera states lent with overflow batches (side ``home``)
  or received (``guest``), by route (``peer``: CUDA IPC read over NVLink, ``host``: bytes);
  ``deltayolo_overflow_fallbacks_total{worker,side,reason}`` those that left the peer route (home: ``no_ipc``,
  ``export_failed``, ``peer_refused``: the peer could not read them, the next states go as bytes for a while;
  guest: ``peer_access``, ran cold, ``read_failed``, the handle opened but the read failed: ran cold, ``unusable``,
  state refused)
- ``deltayolo_overflow_round_trip_ms{worker}`` one overflow batch as the home waited for it (call to reply);
  ``deltayolo_overflow_guest_ms{worker}`` one batch's processing on the guest

``CoordinatorMetrics`` (the coordinator replica):

- ``deltayolo_checkpoint_fetches_total{worker,outcome}`` checkpoint fetch calls, ``ok`` or ``failed`` (a failed
  one keeps the previous checkpoints); ``deltayolo_checkpoint_fetch_bytes_total{worker}`` the bytes they brought
- ``deltayolo_spill_cycles_total{group}`` re-spills of a group soon after it came home (cluster.spill);
  ``deltayolo_spill_hold_factor{group}`` its hold as a multiple of ``spill_hold_s`` from its last spill

Ray exports them with a ``ray_`` prefix. The sink is a protocol so tests (and Serve's local testing mode, where
no Ray runtime exists) use ``MemorySink``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

if TYPE_CHECKING:
    from cluster.cache_transfer import MoveTiming

LATENCY_BOUNDARIES_MS = [5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]

_COUNTERS = {
    "deltayolo_frames_total": ("Frame results published", ("worker", "camera")),
    "deltayolo_frame_errors_total": ("Frames that could not be processed", ("worker", "camera")),
    "deltayolo_delta_decisions_total": ("Delta caching decisions", ("worker", "decision")),
    "deltayolo_bytes_saved_total": ("Decoded bytes not sent through inference", ("worker",)),
    "deltayolo_cache_moves_total": ("Cameras moved in, by kind (warm, cold)", ("worker", "kind")),
    "deltayolo_cache_move_bytes_total": (
        "Camera-state bytes moved, by phase (export, import, checkpoint)", ("worker", "phase")),
    "deltayolo_failovers_total": ("Cameras taken over from a dead worker, by kind (warm, cold)", ("worker", "kind")),
    "deltayolo_overflow_frames_total": (
        "Overflow frames of this home, by outcome (sent, returned, late, refused, failed)", ("worker", "outcome")),
    "deltayolo_overflow_guest_frames_total": ("Frames processed as another worker's overflow guest", ("worker",)),
    "deltayolo_overflow_loans_total": (
        "Overflow camera states lent (home) or received (guest), by route (peer: CUDA IPC, host: bytes)",
        ("worker", "side", "route")),
    "deltayolo_overflow_fallbacks_total": (
        "Overflow states that left the peer route, by side and reason (no_ipc, export_failed, peer_refused, "
        "peer_access, read_failed, unusable)", ("worker", "side", "reason")),
    "deltayolo_checkpoint_fetches_total": ("Checkpoint fetch calls of the coordinator, by outcome (ok, failed)",
                                           ("worker", "outcome")),
    "deltayolo_checkpoint_fetch_bytes_total": ("Checkpoint bytes the coordinator fetched", ("worker",)),
    "deltayolo_spill_cycles_total": ("Groups spilled again soon after they came home", ("group",)),
}
_GAUGES = {
    "deltayolo_fps": ("Processed frames per second (last stats interval)", ("worker",)),
    "deltayolo_latency_p50_ms": ("Capture to publish p50 (last stats interval)", ("worker",)),
    "deltayolo_latency_p99_ms": ("Capture to publish p99 (last stats interval)", ("worker",)),
    "deltayolo_cameras": ("Cameras hosted", ("worker",)),
    "deltayolo_spill_hold_factor": ("A spilled group's hold as a multiple of spill_hold_s", ("group",)),
}
_HISTOGRAMS = {
    "deltayolo_latency_ms": ("Capture to publish latency", ("worker",)),
    "deltayolo_cache_move_ms": ("Time to export, import or checkpoint one camera's state", ("worker", "phase")),
    "deltayolo_failover_checkpoint_age_ms": ("Age of the checkpoints warm fail-overs started from", ("worker",)),
    "deltayolo_overflow_round_trip_ms": ("One overflow batch's round trip, as its home waited for it", ("worker",)),
    "deltayolo_overflow_guest_ms": ("One overflow batch's processing on the guest", ("worker",)),
}


class MetricSink(Protocol):
    def count(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...

    def gauge(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None: ...


class RaySink:
    """ray.util.metrics objects, made in the replica (never at import time)."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._counters: dict[str, Any] = {
            n: metrics.Counter(n, description=d, tag_keys=k) for n, (d, k) in _COUNTERS.items()
        }
        self._gauges: dict[str, Any] = {n: metrics.Gauge(n, description=d, tag_keys=k) for n, (d, k) in _GAUGES.items()}
        self._histograms: dict[str, Any] = {
            n: metrics.Histogram(n, description=d, boundaries=LATENCY_BOUNDARIES_MS, tag_keys=k)
            for n, (d, k) in _HISTOGRAMS.items()
        }

    def count(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._counters[name].inc(value, tags=dict(tags))

    def gauge(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._gauges[name].set(value, tags=dict(tags))

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        self._histograms[name].observe(value, tags=dict(tags))


class MemorySink:
    """Keeps the latest values in memory: counters summed, gauges last, histograms as lists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.observations: dict[str, list[float]] = {}

    def count(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        key = (name, tuple(sorted(tags.items())))
        with self._lock:
            self.counters[key] = self.counters.get(key, 0.0) + value

    def gauge(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        with self._lock:
            self.gauges[(name, tuple(sorted(tags.items())))] = value

    def observe(self, name: str, value: float, tags: Mapping[str, str]) -> None:
        with self._lock:
            self.observations.setdefault(name, []).append(value)

    def total(self, name: str, **tags: str) -> float:
        """Sum of a counter over the series matching ``tags``."""
        with self._lock:
            return sum(v for (n, t), v in self.counters.items() if n == name and set(tags.items()) <= set(t))


def ray_sink_or_memory() -> MetricSink:
    """Ray's metrics inside a Ray worker process; an in-memory sink elsewhere (local testing mode)."""
    try:
        import ray

        if ray.is_initialized():
            return RaySink()
    except ImportError:
        pass
    return MemorySink()


class WorkerMetrics:
    """A Publisher that records a worker's results and stats as metrics."""

    def __init__(self, worker: str, sink: MetricSink) -> None:
        self._tags = {"worker": worker}
        self.sink = sink

    def publish_result(self, result: FrameResult) -> None:
        tags = self._tags
        self.sink.count("deltayolo_frames_total", 1.0, {**tags, "camera": result.camera})
        self.sink.count("deltayolo_delta_decisions_total", 1.0, {**tags, "decision": result.decision})
        saved = result.bytes_decoded * max(0.0, 1.0 - result.inferred_fraction)
        if saved > 0:
            self.sink.count("deltayolo_bytes_saved_total", float(saved), tags)
        latency_ms = (time.monotonic() - result.capture_mono) * 1000.0
        if latency_ms >= 0:
            self.sink.observe("deltayolo_latency_ms", latency_ms, tags)

    def publish_error(self, err: FrameError) -> None:
        self.sink.count("deltayolo_frame_errors_total", 1.0, {**self._tags, "camera": err.camera})

    def publish_stats(self, stats: NodeStats) -> None:
        self.sink.gauge("deltayolo_fps", stats.fps, self._tags)
        self.sink.gauge("deltayolo_latency_p50_ms", stats.latency_p50_ms, self._tags)
        self.sink.gauge("deltayolo_latency_p99_ms", stats.latency_p99_ms, self._tags)

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        return None

    def close(self, timeout: float) -> None:
        return None

    def cameras(self, n: int) -> None:
        self.sink.gauge("deltayolo_cameras", float(n), self._tags)

    def cache_move(self, kind: str) -> None:
        self.sink.count("deltayolo_cache_moves_total", 1.0, {**self._tags, "kind": kind})

    def failover(self, kind: str, checkpoint_age_s: float | None) -> None:
        """A camera taken over from a dead worker: warm (from a checkpoint this old) or cold."""
        self.sink.count("deltayolo_failovers_total", 1.0, {**self._tags, "kind": kind})
        if checkpoint_age_s is not None:
            self.sink.observe("deltayolo_failover_checkpoint_age_ms", checkpoint_age_s * 1000.0, self._tags)

    def overflow(self, outcome: str, n: int = 1) -> None:
        if n > 0:
            self.sink.count("deltayolo_overflow_frames_total", float(n), {**self._tags, "outcome": outcome})

    def round_trip(self, seconds: float) -> None:
        self.sink.observe("deltayolo_overflow_round_trip_ms", seconds * 1000.0, self._tags)

    def guest_frames(self, n: int) -> None:
        if n > 0:
            self.sink.count("deltayolo_overflow_guest_frames_total", float(n), self._tags)

    def guest_latency(self, seconds: float) -> None:
        self.sink.observe("deltayolo_overflow_guest_ms", seconds * 1000.0, self._tags)

    def loan(self, side: str, route: str, n: int = 1) -> None:
        """Camera states lent (side home) or received (side guest) over ``route`` (peer or host)."""
        if n > 0:
            self.sink.count("deltayolo_overflow_loans_total", float(n), {**self._tags, "side": side, "route": route})

    def fallback(self, side: str, reason: str, n: int = 1) -> None:
        """States that did not take the peer route they were meant for, by reason."""
        if n > 0:
            self.sink.count("deltayolo_overflow_fallbacks_total", float(n),
                            {**self._tags, "side": side, "reason": reason})

    def cache_timing(self, timing: MoveTiming) -> None:
        tags = {**self._tags, "phase": timing.phase}
        if timing.ok:
            self.sink.count("deltayolo_cache_move_bytes_total", float(timing.nbytes), tags)
        self.sink.observe("deltayolo_cache_move_ms", timing.seconds * 1000.0, tags)


class CoordinatorMetrics:
    """The coordinator's figures: checkpoint fetches and spill cycles."""

    def __init__(self, sink: MetricSink) -> None:
        self.sink = sink

    def checkpoint_fetch(self, worker: str, ok: bool, nbytes: int) -> None:
        self.sink.count("deltayolo_checkpoint_fetches_total", 1.0,
                        {"worker": worker, "outcome": "ok" if ok else "failed"})
        if nbytes > 0:
            self.sink.count("deltayolo_checkpoint_fetch_bytes_total", float(nbytes), {"worker": worker})

    def spill_hold(self, group: str, factor: int, cycle: bool) -> None:
        """A group spilled, holding ``factor`` times spill_hold_s; ``cycle``: soon after it came home."""
        if cycle:
            self.sink.count("deltayolo_spill_cycles_total", 1.0, {"group": group})
        self.sink.gauge("deltayolo_spill_hold_factor", float(factor), {"group": group})


__all__ = ["CoordinatorMetrics", "MemorySink", "MetricSink", "RaySink", "WorkerMetrics", "ray_sink_or_memory"]
