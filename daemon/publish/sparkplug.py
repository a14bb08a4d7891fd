"""Sparkplug B (v1.0 namespace, spec 3.0 rules) payloads and session state for one edge node.

Protobuf: ``sparkplug_b_pb2.py`` is generated from the Eclipse Tahu ``sparkplug_b.proto`` (Sparkplug 3.0, EPL-2.0)
vendored next to it, with protoc 35.1 (PyPI ``grpcio-tools``; the runtime needs ``protobuf>=7.35``):
``python -m grpc_tools.protoc -I daemon/publish --python_out=daemon/publish daemon/publish/sparkplug_b.proto``
then ``sed -i '1i # mypy: ignore-errors\n# ruff: noqa' daemon/publish/sparkplug_b_pb2.py``. Do not edit it by hand.

Session rules kept here: NDEATH is the MQTT last will and carries ``bdSeq`` (0-255, +1 for every CONNECT,
persisted in the spool database across restarts); NBIRTH carries the same ``bdSeq`` and ``seq`` 0; every later
message of the session (DBIRTH, DDATA, NDATA, DDEATH) carries the next ``seq`` 0-255, wrapping. A device (camera)
gets its DBIRTH before its first DDATA of a session. NCMD ``Node Control/Rebirth = true`` republishes NBIRTH and
every DBIRTH. DDATA replayed from the spool after an outage has its metrics flagged ``is_historical``.

Metric names (node; NBIRTH, NDATA):
  bdSeq (UInt64), Node Control/Rebirth (Boolean), Properties/Software (String), Stats/Backend (String),
  Stats/FPS, Stats/Latency P50 ms, Stats/Latency P99 ms, Stats/Uptime s, Stats/Bytes In per s,
  Stats/Bytes Decoded per s, Stats/Bytes H2D per s, Stats/Bytes D2H per s, Stats/PCIe TX MB per s,
  Stats/PCIe RX MB per s (Double)
Metric names (device = camera id; DBIRTH, DDATA):
  Frame/Seq (UInt64), Frame/Capture Time (DateTime, ms), Frame/Width, Frame/Height (UInt32),
  Frame/Cached (Boolean), Frame/Cache Age s (Double), Detections/Count (UInt32),
  Detections (DataSet: class_id UInt32, class String, score Float, x1 y1 x2 y2 Float, source pixels),
  Error/Seq (UInt64), Error/Kind (String), Error/Message (String),
  State (String), State/Detail (String), Available (Boolean)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from daemon.publish import sparkplug_b_pb2
from daemon.publish.outbound import OutMessage
from daemon.publish.payloads import ONLINE_STATES
from daemon.publish.spool import Spool
from daemon.publish.topics import SPARKPLUG_NAMESPACE, SparkplugTopics
from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

log = logging.getLogger(__name__)
pb: Any = sparkplug_b_pb2  # generated code, untyped
DT: Any = pb.DataType
_BDSEQ_KEY = "sparkplug_bdseq"
REBIRTH = "Node Control/Rebirth"
_DATASET_COLUMNS = ("class_id", "class", "score", "x1", "y1", "x2", "y2")
_DATASET_TYPES = (DT.UInt32, DT.String, DT.Float, DT.Float, DT.Float, DT.Float, DT.Float)
_STATS = (
    ("Stats/FPS", "fps"), ("Stats/Latency P50 ms", "latency_p50_ms"), ("Stats/Latency P99 ms", "latency_p99_ms"),
    ("Stats/Uptime s", "uptime_s"), ("Stats/Bytes In per s", "bytes_in_per_s"),
    ("Stats/Bytes Decoded per s", "bytes_decoded_per_s"), ("Stats/Bytes H2D per s", "bytes_h2d_per_s"),
    ("Stats/Bytes D2H per s", "bytes_d2h_per_s"), ("Stats/PCIe TX MB per s", "pcie_tx_mb_s"),
    ("Stats/PCIe RX MB per s", "pcie_rx_mb_s"),
)
DEVICE_METRICS: tuple[tuple[str, int], ...] = (
    ("Frame/Seq", DT.UInt64), ("Frame/Capture Time", DT.DateTime), ("Frame/Width", DT.UInt32),
    ("Frame/Height", DT.UInt32), ("Frame/Cached", DT.Boolean), ("Frame/Cache Age s", DT.Double),
    ("Detections/Count", DT.UInt32), ("Detections", DT.DataSet), ("Error/Seq", DT.UInt64),
    ("Error/Kind", DT.String), ("Error/Message", DT.String), ("State", DT.String), ("State/Detail", DT.String),
    ("Available", DT.Boolean),
)


def _ms(t: float) -> int:
    return round(t * 1000.0)


def _metric(p: Any, name: str, dtype: int, value: object, ts: int) -> None:
    m = p.metrics.add()
    m.name = name
    m.datatype = dtype
    m.timestamp = ts
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        m.is_null = True
    elif dtype in (DT.UInt64, DT.DateTime, DT.Int64):
        m.long_value = int(value)  # type: ignore[call-overload]
    elif dtype in (DT.UInt32, DT.Int32):
        m.int_value = int(value)  # type: ignore[call-overload]
    elif dtype == DT.Boolean:
        m.boolean_value = bool(value)
    elif dtype == DT.Double:
        m.double_value = float(value)  # type: ignore[arg-type]
    elif dtype == DT.Float:
        m.float_value = float(value)  # type: ignore[arg-type]
    else:
        m.string_value = str(value)


def _detections_dataset(p: Any, result: FrameResult, ts: int) -> None:
    m = p.metrics.add()
    m.name = "Detections"
    m.datatype = DT.DataSet
    m.timestamp = ts
    ds = m.dataset_value
    ds.num_of_columns = len(_DATASET_COLUMNS)
    ds.columns.extend(_DATASET_COLUMNS)
    ds.types.extend(_DATASET_TYPES)
    for d in result.detections:
        row = ds.rows.add()
        row.elements.add().int_value = d.class_id
        row.elements.add().string_value = d.class_name
        for v in (d.score, d.x1, d.y1, d.x2, d.y2):
            row.elements.add().float_value = v


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def stamp(payload: bytes, seq: int, historical: bool) -> bytes:
    """Set ``seq`` (and on a replay, ``is_historical`` on every metric) in an encoded payload."""
    if not historical:
        return payload + b"\x18" + _varint(seq)  # field 3 (seq), varint: appended fields are valid protobuf
    p = pb.Payload()
    p.ParseFromString(payload)
    for m in p.metrics:
        m.is_historical = True
    p.seq = seq
    out: bytes = p.SerializeToString()
    return out


def decode(payload: bytes) -> Any:
    """Bytes -> a Sparkplug Payload message (raises google.protobuf.message.DecodeError)."""
    p = pb.Payload()
    p.ParseFromString(payload)
    return p


def is_rebirth_request(payload: bytes) -> bool:
    """An NCMD asking for a rebirth (``Node Control/Rebirth`` = true)."""
    p = decode(payload)
    return any(m.name == REBIRTH and m.HasField("boolean_value") and m.boolean_value for m in p.metrics)


class SparkplugSession:
    """Encodes messages for one edge node and keeps the session state (bdSeq, seq, born devices)."""

    def __init__(self, topics: SparkplugTopics, spool: Spool, data_qos: int, software: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.topics = topics
        self._spool = spool
        self._qos = data_qos
        self._software = software
        self._clock = clock
        self._lock = threading.Lock()
        self._bdseq = -1
        self._seq = 0
        self._born: set[str] = set()
        self._states: dict[str, tuple[str, str]] = {}
        self._backend = ""

    # -- will / births (bdSeq) --------------------------------------------------------------------------------
    def next_will(self) -> tuple[str, bytes]:
        """bdSeq for the next CONNECT (+1, persisted) and its NDEATH will (topic, payload)."""
        with self._lock:
            if self._bdseq < 0:
                stored = self._spool.get_meta(_BDSEQ_KEY)
                self._bdseq = (int(stored) + 1) % 256 if stored is not None else 0
            else:
                self._bdseq = (self._bdseq + 1) % 256
            self._spool.set_meta(_BDSEQ_KEY, str(self._bdseq))
            bdseq = self._bdseq
        p = pb.Payload()
        p.timestamp = _ms(self._clock())
        _metric(p, "bdSeq", DT.UInt64, bdseq, p.timestamp)
        return self.topics.node("NDEATH"), p.SerializeToString()

    @property
    def bdseq(self) -> int:
        return self._bdseq

    def births(self) -> list[OutMessage]:
        """NBIRTH (seq 0) and a DBIRTH per known camera; starts a new seq run."""
        now = _ms(self._clock())
        p = pb.Payload()
        p.timestamp = now
        p.seq = 0
        _metric(p, "bdSeq", DT.UInt64, max(self._bdseq, 0), now)
        _metric(p, REBIRTH, DT.Boolean, False, now)
        _metric(p, "Properties/Software", DT.String, self._software, now)
        _metric(p, "Stats/Backend", DT.String, self._backend, now)
        for name, _ in _STATS:
            _metric(p, name, DT.Double, None, now)
        self._seq = 0
        self._born.clear()
        out = [OutMessage(0, "sp_birth", self.topics.node("NBIRTH"), p.SerializeToString(), self._qos, False)]
        with self._lock:
            cameras = sorted(self._states)
        out.extend(self._dbirth(cam) for cam in cameras)
        return out

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % 256
        return self._seq

    def _dbirth(self, camera: str) -> OutMessage:
        now = _ms(self._clock())
        with self._lock:
            state, detail = self._states.get(camera, ("unknown", ""))
        p = pb.Payload()
        p.timestamp = now
        p.seq = self._next_seq()
        known = {"State": state, "State/Detail": detail, "Available": state in ONLINE_STATES,
                 "Detections/Count": 0}
        for name, dtype in DEVICE_METRICS:
            if name == "Detections":
                m = p.metrics.add()
                m.name, m.datatype, m.timestamp, m.is_null = name, dtype, now, True
            else:
                _metric(p, name, dtype, known.get(name), now)
        self._born.add(camera)
        return OutMessage(0, "sp_birth", self.topics.device("DBIRTH", camera), p.SerializeToString(),
                          self._qos, False)

    def prepare(self, msg: OutMessage, replay: bool) -> tuple[list[OutMessage], OutMessage | None]:
        """Called by the sender thread right before a Sparkplug message goes out: DBIRTH first, then seq."""
        parts = msg.topic.split("/")
        extra: list[OutMessage] = []
        if len(parts) == 5 and parts[2] in ("DDATA", "DDEATH"):
            camera = parts[4]
            if parts[2] == "DDATA" and camera not in self._born:
                with self._lock:
                    self._states.setdefault(camera, ("unknown", ""))
                extra.append(self._dbirth(camera))
            elif parts[2] == "DDEATH":
                if camera not in self._born:
                    return extra, None  # never born in this session: nothing to kill
                self._born.discard(camera)
        return extra, OutMessage(msg.order, msg.kind, msg.topic, stamp(msg.payload, self._next_seq(), replay),
                                 msg.qos, msg.retain, msg.enqueued)

    # -- encoders (any thread) ---------------------------------------------------------------------------------
    def ddata_result(self, r: FrameResult) -> tuple[str, bytes]:
        ts = _ms(r.capture_time)
        p = pb.Payload()
        p.timestamp = _ms(self._clock())
        _metric(p, "Frame/Seq", DT.UInt64, r.seq, ts)
        _metric(p, "Frame/Capture Time", DT.DateTime, ts, ts)
        _metric(p, "Frame/Width", DT.UInt32, r.width, ts)
        _metric(p, "Frame/Height", DT.UInt32, r.height, ts)
        _metric(p, "Frame/Cached", DT.Boolean, r.cached, ts)
        _metric(p, "Frame/Cache Age s", DT.Double, r.cache_age_s, ts)
        _metric(p, "Detections/Count", DT.UInt32, len(r.detections), ts)
        _detections_dataset(p, r, ts)
        return self.topics.device("DDATA", r.camera), p.SerializeToString()

    def ddata_error(self, err: FrameError) -> tuple[str, bytes]:
        now = _ms(self._clock())
        p = pb.Payload()
        p.timestamp = now
        _metric(p, "Error/Seq", DT.UInt64, err.seq, now)
        _metric(p, "Error/Kind", DT.String, err.kind, now)
        _metric(p, "Error/Message", DT.String, err.message, now)
        return self.topics.device("DDATA", err.camera), p.SerializeToString()

    def camera_state(self, camera: str, state: str, detail: str) -> tuple[str, bytes]:
        """DDATA with the new state, or DDEATH when the camera was removed."""
        now = _ms(self._clock())
        p = pb.Payload()
        p.timestamp = now
        if state == "removed":
            with self._lock:
                self._states.pop(camera, None)
            return self.topics.device("DDEATH", camera), p.SerializeToString()
        with self._lock:
            self._states[camera] = (state, detail)
        _metric(p, "State", DT.String, state, now)
        _metric(p, "State/Detail", DT.String, detail, now)
        _metric(p, "Available", DT.Boolean, state in ONLINE_STATES, now)
        return self.topics.device("DDATA", camera), p.SerializeToString()

    def ndata_stats(self, s: NodeStats) -> tuple[str, bytes]:
        self._backend = s.backend
        ts = _ms(s.time)
        p = pb.Payload()
        p.timestamp = _ms(self._clock())
        _metric(p, "Stats/Backend", DT.String, s.backend, ts)
        for name, attr in _STATS:
            _metric(p, name, DT.Double, getattr(s, attr), ts)
        return self.topics.node("NDATA"), p.SerializeToString()

    def ndeath_now(self) -> tuple[str, bytes]:
        """The NDEATH of the current session, published on a clean stop."""
        p = pb.Payload()
        p.timestamp = _ms(self._clock())
        _metric(p, "bdSeq", DT.UInt64, max(self._bdseq, 0), p.timestamp)
        return self.topics.node("NDEATH"), p.SerializeToString()


def is_sparkplug_topic(topic: str) -> bool:
    return topic.startswith(SPARKPLUG_NAMESPACE + "/")
