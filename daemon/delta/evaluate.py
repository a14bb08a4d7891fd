"""Run one video through the live pipeline with delta caching off and on, and collect what each published.

Used by `deltayolo fidelity --delta`: the every-frame detections are the ground truth; each delta setting is
scored against them (mAP, per-class recall, frames to appear and disappear) next to the work it saved.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

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
from daemon.inference.engine import Engine
from daemon.publish import NullPublisher
from daemon.sources.base import Source
from daemon.sources.replay import ReplaySource as ReplayReader
from daemon.types import Detection, FrameResult


@dataclass(slots=True)
class RunRecord:
    """Everything one run published, by frame sequence."""

    detections: dict[int, tuple[Detection, ...]] = field(default_factory=dict)
    below: dict[int, tuple[Detection, ...]] = field(default_factory=dict)  # with a rank floor: under the threshold
    decisions: dict[int, str] = field(default_factory=dict)
    inferred: dict[int, float] = field(default_factory=dict)
    regions: dict[int, tuple[tuple[float, float, float, float], ...]] = field(default_factory=dict)
    infer_s: float = 0.0  # the pipeline's per-frame shares of inference time, summed
    wall_s: float = 0.0
    engine_s: float = 0.0  # wall time of the engine's infer calls (what the run really spent inferring)
    engine_rows: int = 0  # rows (full frames + region canvases) the engine inferred
    engine_calls: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # rows per engine call -> calls


class TimedEngine:
    """An engine that times its own ``infer`` calls (same process, same engine as the run it serves)."""

    def __init__(self, engine: Engine) -> None:
        self._e = engine
        self.model = engine.model
        self.max_batch = engine.max_batch
        self.name = engine.name
        self.seconds = 0.0
        self.rows = 0
        self.calls = 0
        self.batch_sizes: dict[int, int] = {}

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        t0 = time.perf_counter()
        out = self._e.infer(batch)
        self.seconds += time.perf_counter() - t0
        self.rows += int(batch.shape[0])
        self.calls += 1
        self.batch_sizes[int(batch.shape[0])] = self.batch_sizes.get(int(batch.shape[0]), 0) + 1
        return out

    def close(self) -> None:
        self._e.close()


def _rows(boxes: dict[int, tuple[Detection, ...]]) -> dict[str, list[list[Any]]]:
    return {str(s): [[d.class_id, d.class_name, d.score, d.x1, d.y1, d.x2, d.y2] for d in ds]
            for s, ds in boxes.items()}


def _boxes(raw: dict[str, list[list[Any]]]) -> dict[int, tuple[Detection, ...]]:
    return {int(s): tuple(Detection(int(c), str(n), float(sc), float(x1), float(y1), float(x2), float(y2))
                          for c, n, sc, x1, y1, x2, y2 in ds)
            for s, ds in raw.items()}


def save_record(rec: RunRecord, path: Path) -> None:
    """The every-frame run on disk, so tuning runs reuse it instead of inferring all frames again."""
    path.write_text(json.dumps({
        "detections": _rows(rec.detections), "below": _rows(rec.below),
        "decisions": {str(s): v for s, v in rec.decisions.items()},
        "inferred": {str(s): v for s, v in rec.inferred.items()},
        "regions": {str(s): [list(r) for r in v] for s, v in rec.regions.items()},
        "infer_s": rec.infer_s, "wall_s": rec.wall_s, "engine_s": rec.engine_s, "engine_rows": rec.engine_rows,
        "engine_calls": rec.engine_calls, "batch_sizes": {str(k): v for k, v in rec.batch_sizes.items()},
    }))


def load_record(path: Path) -> RunRecord:
    raw = json.loads(path.read_text())
    return RunRecord(
        detections=_boxes(raw["detections"]), below=_boxes(raw.get("below", {})),
        decisions={int(s): v for s, v in raw["decisions"].items()},
        inferred={int(s): float(v) for s, v in raw["inferred"].items()},
        regions={int(s): tuple((r[0], r[1], r[2], r[3]) for r in v) for s, v in raw.get("regions", {}).items()},
        infer_s=raw["infer_s"], wall_s=raw["wall_s"], engine_s=raw["engine_s"], engine_rows=raw["engine_rows"],
        engine_calls=raw["engine_calls"], batch_sizes={int(k): int(v) for k, v in raw.get("batch_sizes", {}).items()},
    )


class _Collect(NullPublisher):
    def __init__(self, record: RunRecord) -> None:
        self._r = record
        self._lock = threading.Lock()

    def publish_result(self, result: FrameResult) -> None:
        with self._lock:
            self._r.detections[result.seq] = result.detections
            if result.below:
                self._r.below[result.seq] = result.below
            self._r.decisions[result.seq] = result.decision
            self._r.inferred[result.seq] = result.inferred_fraction
            self._r.regions[result.seq] = result.regions
            self._r.infer_s += result.times.infer

def replay_once(engine: EngineChoice, frames: Sequence[bytes], delta: DeltaConfig, max_batch: int = 4,
                rank_floor: float | None = None) -> RunRecord:
    """Every frame once, in order, through the real pipeline (no drops: the replay waits for the pipeline).
    ``rank_floor``: the boxes under the camera's confidence down to it are recorded too (``RunRecord.below``),
    cached as the published ones are; the published boxes are the same as without it."""
    cam = CameraConfig(id="eval", source=ReplaySource(type="replay", path="eval", realtime=False, loop=False),
                       queue_size=8)
    cfg = Config(node=NodeConfig(site="eval", area="eval", line="eval", node="eval"), cameras=(cam,),
                 batching=BatchingConfig(max_batch=max_batch, max_wait_ms=5), delta=delta,
                 stats=StatsConfig(interval_s=3600))

    def factory(c: CameraConfig, sink: object) -> Source:
        return ReplayReader(c.id, "eval", sink, loop=False, realtime=False, frames=frames)  # type: ignore[arg-type]

    record = RunRecord()
    timed = TimedEngine(engine.engine)
    rt = Runtime(cfg, [_Collect(record)], engine=replace(engine, engine=timed), source_factory=factory)
    rt.settings.rank_floor = rank_floor
    t0 = time.monotonic()
    rt.start()
    try:
        while not rt.all_ended():
            time.sleep(0.1)
    finally:
        rt.stop(30.0)
    record.wall_s = time.monotonic() - t0
    record.engine_s, record.engine_rows, record.engine_calls = timed.seconds, timed.rows, timed.calls
    record.batch_sizes = dict(timed.batch_sizes)
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


def call_costs(engine: Engine, sizes: Sequence[int], repeats: int = 7) -> dict[int, float]:
    """Seconds of one ``infer`` call per batch size, the minimum of ``repeats`` interleaved calls (the minimum
    is what the call costs on an idle machine: this box is shared, so single wall-clock runs are noisy)."""
    h, w = engine.model.input_hw
    rng = np.random.default_rng(0)
    best = {b: float("inf") for b in sizes}
    inputs = {b: rng.random((b, 3, h, w), dtype=np.float32) for b in sizes}
    for _ in range(repeats):
        for b in sizes:
            t0 = time.perf_counter()
            engine.infer(inputs[b])
            best[b] = min(best[b], time.perf_counter() - t0)
    return best


def modelled_seconds(rec: RunRecord, costs: dict[int, float]) -> float:
    """The run's inference calls priced at ``costs`` (its own calls, by batch size)."""
    return sum(n * costs[b] for b, n in rec.batch_sizes.items())
