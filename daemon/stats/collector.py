"""Counts what happens to frames and turns it into NodeStats snapshots every interval."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from daemon.stats.model import CameraStats, NodeStats
from daemon.types import FrameError, FrameResult

MAX_LATENCY_SAMPLES = 4096


@dataclass(frozen=True, slots=True)
class SourceCounters:
    """What the collector needs from a source and its queue at snapshot time."""

    camera: str
    received: int
    dropped: int
    skipped: int
    reconnects: int
    last_frame_mono: float | None


@dataclass(slots=True)
class _Camera:
    processed: int = 0
    corrupt: int = 0
    bytes_in: int = 0
    bytes_decoded: int = 0
    bytes_h2d: int = 0
    bytes_d2h: int = 0
    interval_frames: int = 0
    interval_detections: int = 0
    latencies: list[float] = field(default_factory=list)
    decisions: dict[str, int] = field(default_factory=dict)
    interval_inferred: float = 0.0


class StatsCollector:
    def __init__(self, backend: str, backend_reason: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._backend = backend
        self._reason = backend_reason
        self._cams: dict[str, _Camera] = {}
        self._stage_s: dict[str, float] = {}
        self._stage_frames = 0
        self._start = clock()
        self._last = self._start
        self._prev_bytes = (0, 0, 0, 0)
        self._delta_probe: Callable[[str], int | None] | None = None
        self._feature_probe: Callable[[str], tuple[int, int]] | None = None

    def set_delta_probe(self, probe: Callable[[str], int | None]) -> None:
        """Where snapshots read a camera's delta reference memory in bytes (None: delta off for it), e.g.
        ``lambda c: (s.reference_bytes if (s := tracker.snapshot(c)) else None)``."""
        self._delta_probe = probe

    def set_feature_probe(self, probe: Callable[[str], tuple[int, int]]) -> None:
        """Where snapshots read a camera's feature-delta stream: (codec bytes, full FP32 map bytes), cumulative."""
        self._feature_probe = probe

    def add_camera(self, camera: str) -> None:
        with self._lock:
            self._cams.setdefault(camera, _Camera())

    def remove_camera(self, camera: str) -> None:
        with self._lock:
            self._cams.pop(camera, None)

    def record_result(self, result: FrameResult, publish_mono: float, h2d: int = 0, d2h: int = 0) -> None:
        with self._lock:
            cam = self._cams.setdefault(result.camera, _Camera())
            cam.processed += 1
            cam.interval_frames += 1
            cam.interval_detections += len(result.detections)
            cam.decisions[result.decision] = cam.decisions.get(result.decision, 0) + 1
            cam.interval_inferred += result.inferred_fraction
            cam.bytes_in += result.bytes_in
            cam.bytes_decoded += result.bytes_decoded
            cam.bytes_h2d += h2d
            cam.bytes_d2h += d2h
            if len(cam.latencies) < MAX_LATENCY_SAMPLES:
                cam.latencies.append(publish_mono - result.capture_mono)
            t = result.times
            for name, value in (("queue", t.queue), ("decode", t.decode), ("infer", t.infer), ("post", t.post)):
                self._stage_s[name] = self._stage_s.get(name, 0.0) + value
            self._stage_frames += 1

    def record_error(self, error: FrameError, bytes_in: int) -> None:
        with self._lock:
            cam = self._cams.setdefault(error.camera, _Camera())
            cam.corrupt += 1
            cam.bytes_in += bytes_in

    def snapshot(self, sources: Iterable[SourceCounters], liveness_s: float, wall: float | None = None) -> NodeStats:
        """Close the interval and return its figures (cumulative counters stay cumulative)."""
        now = self._clock()
        by_cam = {s.camera: s for s in sources}
        with self._lock:
            interval = max(now - self._last, 1e-9)
            self._last = now
            cams: list[CameraStats] = []
            all_lat: list[float] = []
            frames = 0
            for name in sorted(set(self._cams) | set(by_cam)):
                cam = self._cams.setdefault(name, _Camera())
                src = by_cam.get(name, SourceCounters(name, 0, 0, 0, 0, None))
                p50, p99 = _percentiles_ms(cam.latencies)
                all_lat.extend(cam.latencies)
                frames += cam.interval_frames
                alive = src.last_frame_mono is not None and now - src.last_frame_mono <= liveness_s
                cams.append(CameraStats(
                    camera=name, alive=alive, received=src.received, processed=cam.processed,
                    dropped=src.dropped, skipped=src.skipped, corrupt=cam.corrupt, reconnects=src.reconnects,
                    fps=cam.interval_frames / interval, latency_p50_ms=p50, latency_p99_ms=p99,
                    detections=cam.interval_detections, bytes_in=cam.bytes_in, bytes_decoded=cam.bytes_decoded,
                    bytes_h2d=cam.bytes_h2d, bytes_d2h=cam.bytes_d2h,
                    delta_full=cam.decisions.get("full", 0), delta_regions=cam.decisions.get("regions", 0),
                    delta_skip=cam.decisions.get("skip", 0),
                    inferred_fraction=cam.interval_inferred / cam.interval_frames if cam.interval_frames else 1.0,
                    delta_reference_bytes=(self._delta_probe(name) or 0) if self._delta_probe is not None else 0,
                    **_feature_fields(self._feature_probe, name),
                ))
                cam.interval_inferred = 0.0
                cam.interval_frames = 0
                cam.interval_detections = 0
                cam.latencies = []
            totals = tuple(sum(getattr(c, k) for c in cams)
                           for k in ("bytes_in", "bytes_decoded", "bytes_h2d", "bytes_d2h"))
            rates = [(a - b) / interval for a, b in zip(totals, self._prev_bytes, strict=True)]
            self._prev_bytes = totals
            n = max(self._stage_frames, 1)
            stage_ms = tuple((k, 1000.0 * v / n) for k, v in sorted(self._stage_s.items()))
            self._stage_s = {}
            self._stage_frames = 0
        p50, p99 = _percentiles_ms(all_lat)
        return NodeStats(
            time=time.time() if wall is None else wall, interval_s=interval, uptime_s=now - self._start,
            backend=self._backend, backend_reason=self._reason, fps=frames / interval,
            latency_p50_ms=p50, latency_p99_ms=p99, bytes_in_per_s=rates[0], bytes_decoded_per_s=rates[1],
            bytes_h2d_per_s=rates[2], bytes_d2h_per_s=rates[3], stage_ms=stage_ms, cameras=tuple(cams),
        )


def _percentiles_ms(samples: list[float]) -> tuple[float, float]:
    if not samples:
        return 0.0, 0.0
    arr = np.asarray(samples, dtype=np.float64) * 1000.0
    p50, p99 = np.percentile(arr, [50, 99])
    return float(p50), float(p99)


def _feature_fields(probe: Callable[[str], tuple[int, int]] | None, camera: str) -> dict[str, int]:
    if probe is None:
        return {}
    sent, full = probe(camera)
    return {"feature_delta_bytes": sent, "feature_full_bytes": full}
