"""JSON-lines publisher: one versioned record per line (the same payloads MQTT carries)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, TextIO

from daemon.publish import payloads
from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

log = logging.getLogger(__name__)


class JsonlPublisher:
    """Appends records to a file ('-' is stdout). Writes are serialized; a full disk is logged, not fatal."""

    def __init__(self, path: str, include_stats: bool = True, flush_every: int = 1) -> None:
        self._path = path
        self._include_stats = include_stats
        self._flush_every = flush_every
        self._pending = 0
        self._lock = threading.Lock()
        self.write_errors = 0
        self.records = 0
        if path == "-":
            self._fh: TextIO = sys.stdout
            self._owned = False
        else:
            p = Path(path).expanduser()
            p.parent.mkdir(parents=True, exist_ok=True)
            self._fh = p.open("a", encoding="utf-8", buffering=1 << 16)
            self._owned = True

    def publish_result(self, result: FrameResult) -> None:
        self._write({"kind": "detections", **payloads.detections_payload(result)})

    def publish_error(self, err: FrameError) -> None:
        self._write({"kind": "frame_error", **payloads.frame_error_payload(err)})

    def publish_stats(self, stats: NodeStats) -> None:
        if self._include_stats:
            self._write({"kind": "stats", **payloads.stats_payload(stats)})

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        self._write({"kind": "camera_state", **payloads.camera_state_payload(camera, state, detail)})

    def close(self, timeout: float) -> None:
        with self._lock:
            try:
                self._fh.flush()
                if self._owned:
                    os.fsync(self._fh.fileno())
                    self._fh.close()
            except (OSError, ValueError) as exc:
                self.write_errors += 1
                log.error("closing %s failed: %s", self._path, exc)

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            try:
                self._fh.write(line)
                self.records += 1
                self._pending += 1
                if self._pending >= self._flush_every:
                    self._fh.flush()
                    self._pending = 0
            except (OSError, ValueError) as exc:
                self.write_errors += 1
                if self.write_errors & (self.write_errors - 1) == 0:
                    log.error("writing %s failed (%d times): %s", self._path, self.write_errors, exc)
