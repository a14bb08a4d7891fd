"""Stats snapshots: what the stats thread emits every interval (JSONL, MQTT, /metrics read these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CameraStats:
    camera: str
    alive: bool  # a frame arrived within the liveness window
    received: int  # frames handed over by the source (cumulative)
    processed: int  # frames with published results (cumulative)
    dropped: int  # frames dropped by a full queue (cumulative)
    skipped: int  # frames skipped by the fps cap (cumulative)
    corrupt: int  # frames that failed to decode or validate (cumulative)
    reconnects: int  # source reconnect attempts (cumulative)
    fps: float  # processed frames per second over the last interval
    latency_p50_ms: float  # capture -> publish, last interval
    latency_p99_ms: float
    detections: int  # boxes published over the last interval
    bytes_in: int  # encoded bytes received (cumulative)
    bytes_decoded: int  # decoded pixel bytes produced (cumulative)
    bytes_h2d: int  # host-to-device bytes (cumulative; 0 on the CPU path)
    bytes_d2h: int  # device-to-host bytes (cumulative; 0 on the CPU path)
    delta_full: int = 0  # frames inferred whole (cumulative)
    delta_regions: int = 0  # frames inferred on changed regions only (cumulative)
    delta_skip: int = 0  # frames answered from the cache without inference (cumulative)
    inferred_fraction: float = 1.0  # share of frame pixels inferred over the last interval
    delta_reference_bytes: int = 0  # memory of the camera's delta reference (signature + cached boxes)
    feature_delta_bytes: int = 0  # delta.feature_stream: feature-delta codec bytes (cumulative)
    feature_full_bytes: int = 0  # what full FP32 feature maps of the same frames would have been (cumulative)


@dataclass(frozen=True, slots=True)
class NodeStats:
    time: float  # wall clock of the snapshot
    interval_s: float
    uptime_s: float
    backend: str  # e.g. "cpu:onnxruntime", "gpu:dali+onnxruntime-cuda"
    backend_reason: str
    fps: float
    latency_p50_ms: float
    latency_p99_ms: float
    bytes_in_per_s: float
    bytes_decoded_per_s: float
    bytes_h2d_per_s: float
    bytes_d2h_per_s: float
    stage_ms: tuple[tuple[str, float], ...]  # mean ms per frame per stage over the interval
    cameras: tuple[CameraStats, ...]
    pcie_tx_mb_s: float | None = None  # NVML, GPU path only
    pcie_rx_mb_s: float | None = None
    gpu_mem_used_mb: float | None = None
    corrupt_boxes: int = 0  # cumulative: decoded boxes with a NaN/inf value (a corrupt engine output), left out
