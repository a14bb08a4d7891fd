"""Prometheus view of the latest NodeStats snapshot, registered on a per-server CollectorRegistry.

Only what NodeStats holds is exported: nothing is invented or left as a placeholder. Cumulative counters
(frames, bytes, reconnects) are counters; interval figures (fps, latency quantiles, stage times) are gauges.
GPU memory and PCIe series appear only when the snapshot has them (GPU path with NVML).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from daemon.stats.model import CameraStats, NodeStats

PREFIX = "deltayolo"


class StatsProvider(Protocol):
    """Where the latest stats snapshot comes from (``daemon.app.Runtime`` fits)."""

    def latest_stats(self) -> NodeStats | None: ...


class NodeStatsCollector(Collector):
    """Reads ``provider.latest_stats()`` at every scrape."""

    def __init__(self, provider: StatsProvider) -> None:
        self._provider = provider

    def collect(self) -> Iterable[Metric]:
        snap = self._provider.latest_stats()
        available = GaugeMetricFamily(f"{PREFIX}_stats_available",
                                      "1 when a stats snapshot exists (0 before the first interval)")
        available.add_metric([], 0.0 if snap is None else 1.0)
        yield available
        if snap is None:
            return
        yield from _node_metrics(snap)
        yield from _camera_metrics(snap.cameras)
        yield from _gpu_metrics(snap)

    def describe(self) -> Iterable[Metric]:
        return ()


def build_registry(provider: StatsProvider) -> CollectorRegistry:
    """A fresh registry holding only this provider's collector (never the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeStatsCollector(provider))
    return registry


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f"{PREFIX}_{name}", doc)
    g.add_metric([], value)
    return g


def _node_metrics(s: NodeStats) -> Iterator[Metric]:
    info = InfoMetricFamily(f"{PREFIX}_backend", "Inference backend in use and why it was chosen")
    info.add_metric([], {"backend": s.backend, "reason": s.backend_reason})
    yield info
    yield _gauge("stats_timestamp_seconds", "Wall-clock time of the snapshot", s.time)
    yield _gauge("stats_interval_seconds", "Length of the interval the snapshot covers", s.interval_s)
    yield _gauge("uptime_seconds", "Seconds since the pipeline started", s.uptime_s)
    yield _gauge("fps", "Processed frames per second over the last interval, all cameras", s.fps)
    corrupt = CounterMetricFamily(f"{PREFIX}_corrupt_boxes", "Decoded boxes with a NaN or infinite value (a "
                                  "corrupt engine output), left out of the results")
    corrupt.add_metric([], float(s.corrupt_boxes))
    yield corrupt
    lat = GaugeMetricFamily(f"{PREFIX}_latency_seconds",
                            "Capture-to-publish latency quantiles over the last interval, all cameras",
                            labels=["quantile"])
    lat.add_metric(["0.5"], s.latency_p50_ms / 1000.0)
    lat.add_metric(["0.99"], s.latency_p99_ms / 1000.0)
    yield lat
    rate = GaugeMetricFamily(f"{PREFIX}_bytes_per_second",
                             "Bytes per second over the last interval by stage (in: encoded from cameras, "
                             "decoded: pixels, h2d/d2h: host<->device copies)", labels=["stage"])
    for stage, value in (("in", s.bytes_in_per_s), ("decoded", s.bytes_decoded_per_s),
                         ("h2d", s.bytes_h2d_per_s), ("d2h", s.bytes_d2h_per_s)):
        rate.add_metric([stage], value)
    yield rate
    stage_t = GaugeMetricFamily(f"{PREFIX}_stage_seconds",
                                "Mean seconds per frame per pipeline stage over the last interval",
                                labels=["stage"])
    for stage, ms in s.stage_ms:
        stage_t.add_metric([stage], ms / 1000.0)
    yield stage_t


_CAMERA_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("received", "camera_received_frames", "Frames handed over by the source"),
    ("processed", "camera_processed_frames", "Frames with published results"),
    ("dropped", "camera_dropped_frames", "Frames dropped by a full queue"),
    ("skipped", "camera_skipped_frames", "Frames skipped by the fps cap"),
    ("corrupt", "camera_corrupt_frames", "Frames that failed to decode or validate"),
    ("reconnects", "camera_reconnects", "Source reconnect attempts"),
)


def _camera_metrics(cams: tuple[CameraStats, ...]) -> Iterator[Metric]:
    for attr, name, doc in _CAMERA_COUNTERS:
        c = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["camera"])
        for cam in cams:
            c.add_metric([cam.camera], float(getattr(cam, attr)))
        yield c
    bytes_total = CounterMetricFamily(f"{PREFIX}_camera_bytes", "Bytes per camera by stage",
                                      labels=["camera", "stage"])
    for cam in cams:
        for stage, value in (("in", cam.bytes_in), ("decoded", cam.bytes_decoded),
                             ("h2d", cam.bytes_h2d), ("d2h", cam.bytes_d2h)):
            bytes_total.add_metric([cam.camera, stage], float(value))
    yield bytes_total
    up = GaugeMetricFamily(f"{PREFIX}_camera_up", "1 when a frame arrived within the liveness window",
                           labels=["camera"])
    fps = GaugeMetricFamily(f"{PREFIX}_camera_fps", "Processed frames per second over the last interval",
                            labels=["camera"])
    det = GaugeMetricFamily(f"{PREFIX}_camera_detections", "Boxes published over the last interval",
                            labels=["camera"])
    lat = GaugeMetricFamily(f"{PREFIX}_camera_latency_seconds",
                            "Capture-to-publish latency quantiles over the last interval",
                            labels=["camera", "quantile"])
    for cam in cams:
        up.add_metric([cam.camera], 1.0 if cam.alive else 0.0)
        fps.add_metric([cam.camera], cam.fps)
        det.add_metric([cam.camera], float(cam.detections))
        lat.add_metric([cam.camera, "0.5"], cam.latency_p50_ms / 1000.0)
        lat.add_metric([cam.camera, "0.99"], cam.latency_p99_ms / 1000.0)
    yield from (up, fps, det, lat)
    decisions = CounterMetricFamily(f"{PREFIX}_camera_delta_decisions",
                                    "Frames per delta-caching decision (full, regions, skip)",
                                    labels=["camera", "decision"])
    inferred = GaugeMetricFamily(f"{PREFIX}_camera_inferred_fraction",
                                 "Share of frame pixels inferred over the last interval (1: every frame whole)",
                                 labels=["camera"])
    ref_bytes = GaugeMetricFamily(f"{PREFIX}_camera_delta_reference_bytes",
                                  "Memory of the camera's delta reference (signature and cached boxes)",
                                  labels=["camera"])
    for cam in cams:
        for decision, n in (("full", cam.delta_full), ("regions", cam.delta_regions), ("skip", cam.delta_skip)):
            decisions.add_metric([cam.camera, decision], float(n))
        inferred.add_metric([cam.camera], cam.inferred_fraction)
        ref_bytes.add_metric([cam.camera], float(cam.delta_reference_bytes))
    yield from (decisions, inferred, ref_bytes)


def _gpu_metrics(s: NodeStats) -> Iterator[Metric]:
    if s.gpu_mem_used_mb is not None:
        yield _gauge("gpu_memory_used_megabytes", "GPU memory in use (NVML)", s.gpu_mem_used_mb)
    if s.pcie_tx_mb_s is not None:
        yield _gauge("pcie_tx_megabytes_per_second", "PCIe transmit throughput, device to host (NVML)",
                     s.pcie_tx_mb_s)
    if s.pcie_rx_mb_s is not None:
        yield _gauge("pcie_rx_megabytes_per_second", "PCIe receive throughput, host to device (NVML)",
                     s.pcie_rx_mb_s)


__all__ = ["NodeStatsCollector", "StatsProvider", "build_registry"]
