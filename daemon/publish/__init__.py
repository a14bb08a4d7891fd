"""Publishing results: the Publisher protocol, MQTT for MES, payloads, topics, spool, commands."""

from __future__ import annotations

from typing import Protocol

from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult


class Publisher(Protocol):
    """Called from the pipeline's publish thread: never blocks for long, never raises on transport trouble."""

    def publish_result(self, result: FrameResult) -> None: ...

    def publish_error(self, err: FrameError) -> None: ...

    def publish_stats(self, stats: NodeStats) -> None: ...

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None: ...

    def close(self, timeout: float) -> None: ...


class NullPublisher:
    """Publishes nothing: a base for in-process collectors (benchmarks, evaluations) that override what they need."""

    def publish_result(self, result: FrameResult) -> None:
        return None

    def publish_error(self, err: FrameError) -> None:
        return None

    def publish_stats(self, stats: NodeStats) -> None:
        return None

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        return None

    def close(self, timeout: float) -> None:
        return None
