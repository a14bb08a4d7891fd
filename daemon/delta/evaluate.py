"""Run one video through the live pipeline with delta caching off and on, and collect what each published.

Used by `deltayolo fidelity --delta`: the every-frame detections are the ground truth; each delta setting is
scored against them (mAP, per-class recall, frames to appear and disappear) next to the work it saved.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from daemon.app import Runtime
from daemon.backend import EngineChoice
from daemon.config.model import (
    BatchingConfig,
    CameraConfig,
    Config,
    DeltaConfig,
    NodeConfig,
    ReplaySource,
    StatsConfig,
)
from daemon.publish import NullPublisher
from daemon.sources.base import Source
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.types import Detection, FrameResult


@dataclass(slots=True)
class RunRecord:
    """Everything one run published, by frame sequence."""

    detections: dict[int, tuple[Detection, ...]] = field(default_factory=dict)
    decisions: dict[int, str] = field(default_factory=dict)
    inferred: dict[int, float] = field(default_factory=dict)
    infer_s: float = 0.0
    wall_s: float = 0.0


class _Collect(NullPublisher):
    def __init__(self, record: RunRecord) -> None:
        self._r = record
        self._lock = threading.Lock()

    def publish_result(self, result: FrameResult) -> None:
        with self._lock:
            self._r.detections[result.seq] = result.detections
            self._r.decisions[result.seq] = result.decision
            self._r.inferred[result.seq] = result.inferred_fraction
            self._r.infer_s += result.times.infer






def replay_once(engine: EngineChoice, frames: Sequence[bytes], delta: DeltaConfig, max_batch: int = 4) -> RunRecord:
    """Every frame once, in order, through the real pipeline (no drops: the replay waits for the pipeline)."""
    cam = CameraConfig(id="eval", source=ReplaySource(type="replay", path="eval", realtime=False, loop=False),
                       queue_size=8)
    cfg = Config(node=NodeConfig(site="eval", area="eval", line="eval", node="eval"), cameras=(cam,),
                 batching=BatchingConfig(max_batch=max_batch, max_wait_ms=5), delta=delta,
                 stats=StatsConfig(interval_s=3600))

    def factory(c: CameraConfig, sink: object) -> Source:
        return ReplayReader(c.id, "eval", sink, loop=False, realtime=False, frames=frames)  # type: ignore[arg-type]

    record = RunRecord()
    rt = Runtime(cfg, [_Collect(record)], engine=engine, source_factory=factory)
    t0 = time.monotonic()
    rt.start()
    try:
        while not rt.all_ended():
            time.sleep(0.1)
    finally:
        rt.stop(30.0)
    record.wall_s = time.monotonic() - t0
    return record


@dataclass(frozen=True, slots=True)
class TrackLag:
    appear_frames: tuple[int, ...]  # per reference track: frames until the candidate first matched it
    disappear_frames: tuple[int, ...]  # per ended track: frames the candidate kept a box after it was gone


def _iou(a: Detection, b: Detection) -> float:
    iw = min(a.x2, b.x2) - max(a.x1, b.x1)
    ih = min(a.y2, b.y2) - max(a.y1, b.y1)
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter)


def _match(d: Detection, boxes: Sequence[Detection], thr: float) -> bool:
    return any(b.class_id == d.class_id and _iou(d, b) >= thr for b in boxes)


def track_lags(reference: dict[int, tuple[Detection, ...]], candidate: dict[int, tuple[Detection, ...]],
               link_iou: float = 0.3, match_iou: float = 0.5, min_len: int = 5) -> TrackLag:
    """Link reference boxes frame to frame into tracks (greedy IoU); for tracks of at least ``min_len`` frames,
    count how long the candidate took to show the object and how long it kept showing it after it left."""
    seqs = sorted(reference)
    tracks: list[list[tuple[int, Detection]]] = []
    open_tracks: list[list[tuple[int, Detection]]] = []
    for s in seqs:
        nxt = []
        for d in reference[s]:
            best = max(open_tracks, key=lambda t: _iou(t[-1][1], d) if t[-1][1].class_id == d.class_id else 0.0,
                       default=None)
            if best is not None and best[-1][1].class_id == d.class_id and _iou(best[-1][1], d) >= link_iou:
                open_tracks.remove(best)
                best.append((s, d))
                nxt.append(best)
            else:
                t = [(s, d)]
                tracks.append(t)
                nxt.append(t)
        open_tracks = nxt
    appear, disappear = [], []
    last = seqs[-1] if seqs else 0
    for t in tracks:
        if len(t) < min_len:
            continue
        lag = next((i for i, (s, d) in enumerate(t) if _match(d, candidate.get(s, ()), match_iou)), len(t))
        appear.append(lag)
        end_seq, end_box = t[-1]
        if end_seq < last:
            extra = 0
            for s in range(end_seq + 1, last + 1):
                if not _match(end_box, candidate.get(s, ()), match_iou):
                    break
                extra += 1
            disappear.append(extra)
    return TrackLag(tuple(appear), tuple(disappear))
