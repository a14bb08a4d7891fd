"""Frozen dataclasses -> versioned JSON payloads, described by daemon/schemas/mqtt-v1.json.

Every payload is an object with ``kind`` (which message) and ``v`` (payload version, 1). Times are Unix seconds
(float), boxes are source-image pixels. Non-finite floats become null (JSON has no NaN).
"""

from __future__ import annotations

import json
import math
import secrets
import time
from importlib import resources
from typing import Any

from daemon.stats.model import CameraStats, NodeStats
from daemon.types import FrameError, FrameResult

VERSION = 1
SCHEMA_FILE = "mqtt-v1.json"
ONLINE_STATES = frozenset({"online", "streaming", "running", "connected", "live", "ok"})

Payload = dict[str, Any]
# this process's run: ``seq`` restarts at 0 when a daemon restarts, and a write-ahead spool replays a killed run's
# messages after it, so consumers deduplicate on (camera, run, seq)
RUN_ID = secrets.token_hex(8)


def _f(x: float | None, nd: int = 3) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), nd)


def detections_payload(result: FrameResult, now: float | None = None) -> Payload:
    t = result.times
    return {
        "kind": "detections",
        "v": VERSION,
        "camera": result.camera,
        "run": RUN_ID,
        "seq": result.seq,
        "capture_time": _f(result.capture_time, 6),
        "publish_time": _f(time.time() if now is None else now, 6),
        "cached": result.cached,
        "cache_age_s": _f(result.cache_age_s),
        "width": result.width,
        "height": result.height,
        "count": len(result.detections),
        "boxes": [
            {
                "class_id": d.class_id,
                "class": d.class_name,
                "score": _f(d.score, 4),
                "x1": _f(d.x1, 1),
                "y1": _f(d.y1, 1),
                "x2": _f(d.x2, 1),
                "y2": _f(d.y2, 1),
                "cached": d.cached,
                "age_s": _f(d.age_s),
            }
            for d in result.detections
        ],
        "decision": result.decision,
        "inferred_fraction": _f(result.inferred_fraction),
        "bytes_h2d": result.bytes_h2d,
        "bytes_d2h": result.bytes_d2h,
        "stage_ms": {
            "queue": _f(t.queue * 1000.0), "decode": _f(t.decode * 1000.0),
            "infer": _f(t.infer * 1000.0), "post": _f(t.post * 1000.0),
        },
        "bytes_in": result.bytes_in,
        "bytes_decoded": result.bytes_decoded,
    }


def frame_error_payload(err: FrameError, now: float | None = None) -> Payload:
    return {
        "kind": "frame_error",
        "v": VERSION,
        "camera": err.camera,
        "run": RUN_ID,
        "seq": err.seq,
        "error": err.kind,
        "message": err.message,
        "time": _f(time.time() if now is None else now, 6),
    }


def _camera_stats(c: CameraStats) -> Payload:
    return {
        "camera": c.camera, "alive": c.alive, "received": c.received, "processed": c.processed,
        "dropped": c.dropped, "skipped": c.skipped, "corrupt": c.corrupt, "reconnects": c.reconnects,
        "fps": _f(c.fps), "latency_p50_ms": _f(c.latency_p50_ms), "latency_p99_ms": _f(c.latency_p99_ms),
        "detections": c.detections, "bytes_in": c.bytes_in, "bytes_decoded": c.bytes_decoded,
        "bytes_h2d": c.bytes_h2d, "bytes_d2h": c.bytes_d2h,
        "delta": {"full": c.delta_full, "regions": c.delta_regions, "skip": c.delta_skip,
                  "inferred_fraction": _f(min(max(c.inferred_fraction, 0.0), 1.0)),
                  "reference_bytes": c.delta_reference_bytes},
        **({"feature_stream": {"bytes": c.feature_delta_bytes, "full_bytes": c.feature_full_bytes}}
           if c.feature_full_bytes else {}),
    }


def stats_payload(stats: NodeStats) -> Payload:
    return {
        "kind": "stats",
        "v": VERSION,
        "time": _f(stats.time, 6),
        "interval_s": _f(stats.interval_s),
        "uptime_s": _f(stats.uptime_s),
        "backend": stats.backend,
        "backend_reason": stats.backend_reason,
        "fps": _f(stats.fps),
        "latency_p50_ms": _f(stats.latency_p50_ms),
        "latency_p99_ms": _f(stats.latency_p99_ms),
        "bandwidth": {
            "bytes_in_per_s": _f(stats.bytes_in_per_s, 1),
            "bytes_decoded_per_s": _f(stats.bytes_decoded_per_s, 1),
            "bytes_h2d_per_s": _f(stats.bytes_h2d_per_s, 1),
            "bytes_d2h_per_s": _f(stats.bytes_d2h_per_s, 1),
            "pcie_tx_mb_s": _f(stats.pcie_tx_mb_s),
            "pcie_rx_mb_s": _f(stats.pcie_rx_mb_s),
        },
        "gpu_mem_used_mb": _f(stats.gpu_mem_used_mb, 1),
        "corrupt_boxes": stats.corrupt_boxes,
        "stage_ms": {name: _f(ms) for name, ms in stats.stage_ms},
        "cameras": [_camera_stats(c) for c in stats.cameras],
    }


def camera_state_payload(camera: str, state: str, detail: str, now: float | None = None) -> Payload:
    return {
        "kind": "camera_state",
        "v": VERSION,
        "camera": camera,
        "state": state,
        "detail": detail,
        "available": state in ONLINE_STATES,
        "time": _f(time.time() if now is None else now, 6),
    }


def availability_payload(camera: str, online: bool, now: float | None = None) -> Payload:
    return {
        "kind": "availability",
        "v": VERSION,
        "camera": camera,
        "state": "online" if online else "offline",
        "time": _f(time.time() if now is None else now, 6),
    }


def status_payload(online: bool, client_id: str, software: str, clean: bool, now: float | None = None) -> Payload:
    """Node status. ``clean`` is false in the last will (the broker lost us), true when we said goodbye."""
    return {
        "kind": "status",
        "v": VERSION,
        "state": "online" if online else "offline",
        "clean": clean,
        "client_id": client_id,
        "software": software,
        "time": _f(time.time() if now is None else now, 6),
    }


def ack_payload(
    command: str, camera: str | None, request_id: str | None, ok: bool, message: str, now: float | None = None
) -> Payload:
    return {
        "kind": "cmd_ack",
        "v": VERSION,
        "command": command,
        "camera": camera,
        "id": request_id,
        "ok": ok,
        "message": message,
        "time": _f(time.time() if now is None else now, 6),
    }


def encode(payload: Payload) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def load_schema() -> dict[str, Any]:
    """The JSON Schema shipped in the package (daemon/schemas/mqtt-v1.json)."""
    text = resources.files("daemon").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema
