"""What every runtime benchmark shares: N cameras replaying the same JPEG frames as fast as the pipeline takes
them, the daemon's own Runtime, and a measured window after a warm-up (stats snapshots around it, the latency of
every result published inside it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import (
    BatchingConfig,
    CameraConfig,
    Config,
    DeltaConfig,
    ModelConfig,
    NodeConfig,
    ReplaySource,
    StatsConfig,
)
from daemon.publish import NullPublisher
from daemon.sources.base import Source
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.stats.model import NodeStats
from daemon.types import FrameResult


class LatencyCounter(NullPublisher):
    """A publisher that only records the latency of each result while ``measuring``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.measuring = False
        self.latencies: list[float] = []

    def publish_result(self, result: FrameResult) -> None:
        if self.measuring:
            lat = time.monotonic() - result.capture_mono
            with self._lock:
                self.latencies.append(lat)


def replay_config(cameras: int, max_batch: int, max_wait_ms: float, delta: bool, queue_size: int,
                  model: ModelConfig | None = None) -> Config:
    """``cameras`` replay cameras ``cam0``... (their frames come from ``replay_sources``)."""
    cams = tuple(CameraConfig(id=f"cam{i}", source=ReplaySource(type="replay", path="bench", realtime=False),
                              queue_size=queue_size) for i in range(cameras))
    return Config(node=NodeConfig(site="bench", area="bench", line="bench", node="bench"),
                  model=model or ModelConfig(), cameras=cams,
                  batching=BatchingConfig(max_batch=max_batch, max_wait_ms=max_wait_ms),
                  stats=StatsConfig(interval_s=3600), delta=DeltaConfig(enabled=delta))


def replay_sources(frames: Sequence[bytes], stagger: int = 0) -> Callable[[CameraConfig, Any], Source]:
    """A source factory: camera ``camK`` loops over ``frames`` from frame ``K * stagger`` (0: all in step)."""

    def factory(cam: CameraConfig, sink: Any) -> Source:
        k = int(cam.id.removeprefix("cam")) * stagger % len(frames)
        return ReplayReader(cam.id, "bench", sink, loop=True, realtime=False, frames=[*frames[k:], *frames[:k]])

    return factory


@dataclass(frozen=True, slots=True)
class ReplayRun:
    seconds: float
    latencies: list[float]  # of the results published in the measured window
    before: NodeStats  # stats snapshots at the window's start and end (cumulative counters subtract)
    after: NodeStats
    probe_before: Any = None  # what ``probe(runtime)`` read at the start and the end
    probe_after: Any = None


def measure(cfg: Config, choice: EngineChoice, frames: Sequence[bytes], warmup: float, seconds: float,
            stagger: int = 0, during: Callable[[], AbstractContextManager[Any]] = nullcontext,
            probe: Callable[[Runtime], Any] | None = None) -> ReplayRun:
    """Start a Runtime on ``cfg`` with ``choice`` and replayed ``frames``, let it warm up, measure ``seconds``
    (inside ``during()``, e.g. an NVML sampler), stop it. The engine stays open (the caller's)."""
    counter = LatencyCounter()
    rt = Runtime(cfg, [counter], engine=choice, source_factory=replay_sources(frames, stagger))
    rt.start()
    try:
        time.sleep(warmup)
        p0 = probe(rt) if probe is not None else None
        before = rt.stats.snapshot([], 1.0)  # also resets the per-interval stage means
        counter.measuring = True
        with during():
            t0 = time.monotonic()
            time.sleep(seconds)
            counter.measuring = False
            elapsed = time.monotonic() - t0
        after = rt.stats.snapshot([], 1.0)
        p1 = probe(rt) if probe is not None else None
    finally:
        rt.stop(15.0)
    return ReplayRun(elapsed, list(counter.latencies), before, after, p0, p1)
