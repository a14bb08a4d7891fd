"""A repeatable replay of delta caching's host work (plan, fit_regions, resolve) for many cameras, as the GPU
path does it per batch: tools/delta_plan_bench.py times it, tests/test_delta_plan_equality.py pins its outputs.

Inputs are real: vtest's luma signatures, tile scores against each camera's reference computed on the host with
the arithmetic the device uses (daemon.delta.changemap.tile_scores; not timed, the device does it), and YOLOv8n
detections of each vtest frame recorded once (tests/data/delta_plan_inputs.json). Camera k replays the recorded
frames from frame ``k * offset`` on, wrapping round; a batch holds ``per_batch`` consecutive frames of every
camera, planned in rounds (daemon.gpu.prepare.planning_rounds), packed with fit_regions and then resolved. A
REGIONS frame's fresh boxes are the recorded boxes whose centre lies in one of its regions.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from daemon.delta.changemap import tile_scores
from daemon.delta.policy import Decision, DeltaParams, Verdict
from daemon.delta.signature import SIGNATURE_FACTOR, luma_signature
from daemon.delta.tracker import DeltaTracker, to_source
from daemon.types import Detection, Frame, Letterbox

Box = tuple[int, str, float, float, float, float, float]  # class id, name, score, x1, y1, x2, y2 (source px)


@dataclass(frozen=True, slots=True)
class ReplayInputs:
    signatures: tuple[NDArray[np.uint8], ...]  # one per recorded frame
    boxes: tuple[tuple[Box, ...], ...]  # one tuple per recorded frame
    letterbox: Letterbox


@dataclass(slots=True)
class Timings:
    """Host seconds spent in each call, summed over the replay."""

    plan_s: float = 0.0
    fit_s: float = 0.0
    resolve_s: float = 0.0
    frames: int = 0
    batches: int = 0
    decisions: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _Item:
    frame: Frame
    verdict: Verdict
    index: int  # recorded frame


def read_boxes(path: Path) -> tuple[tuple[Box, ...], ...]:
    """The recorded detections: ``{"names": {id: name}, "frames": [[[id, score*1000, x1, y1, x2, y2], ...]]}``."""
    raw = json.loads(path.read_text())
    names = {int(k): str(v) for k, v in raw["names"].items()}
    return tuple(tuple((int(c), names[int(c)], s / 1000.0, float(x1), float(y1), float(x2), float(y2))
                       for c, s, x1, y1, x2, y2 in frame) for frame in raw["frames"])


def video_signatures(video: Path, count: int, size: int = 640) -> tuple[tuple[NDArray[np.uint8], ...], Letterbox]:
    """The luma signatures of the first ``count`` frames of ``video`` (OpenCV decode, letterboxed to ``size``)."""
    import cv2

    from daemon.decode.letterbox import letterbox_params

    cap = cv2.VideoCapture(str(video))
    sigs: list[NDArray[np.uint8]] = []
    lb: Letterbox | None = None
    try:
        while len(sigs) < count:
            ok, img = cap.read()
            if not ok:
                break
            lb = letterbox_params(img.shape[1], img.shape[0], size)
            sigs.append(luma_signature(np.asarray(img, np.uint8), lb, size))
    finally:
        cap.release()
    if lb is None or len(sigs) < count:
        raise ValueError(f"{video}: {len(sigs)} frames read, {count} wanted")
    return tuple(sigs), lb


def load_inputs(video: Path, boxes_json: Path, size: int = 640) -> ReplayInputs:
    boxes = read_boxes(boxes_json)
    sigs, lb = video_signatures(video, len(boxes), size)
    return ReplayInputs(sigs, boxes, lb)


def _fresh(boxes: Sequence[Box], verdict: Verdict, lb: Letterbox) -> list[Detection]:
    dets = [Detection(*b) for b in boxes]
    if verdict.decision is Decision.FULL:
        return dets
    if verdict.decision is Decision.SKIP:
        return []
    regions = [to_source(r, lb) for r in verdict.regions]
    return [d for d in dets if any(r.contains((d.x1 + d.x2) / 2, (d.y1 + d.y2) / 2) for r in regions)]


def replay(inputs: ReplayInputs, params: DeltaParams, batches: int, cameras: int = 16, per_batch: int = 4,
           offset: int = 15, fps: float = 10.0, capacity: int = 64, size: int = 640, hold: int = 1,
           trace: list[str] | None = None) -> Timings:
    """Run the replay; ``trace`` (when given) gets one canonical line per frame and one per batch end (the
    cameras' exported states), everything the decisions and outputs consist of. ``hold``: odd cameras show each
    of their frames ``hold`` times (a still scene between changes: SKIP frames)."""
    from daemon.pipeline.prepare import fit_regions

    tr = DeltaTracker()
    names = [f"cam{k:02d}" for k in range(cameras)]
    for cam in names:
        tr.configure(cam, params)
    n = len(inputs.signatures)
    cpt = params.tile // SIGNATURE_FACTOR
    lb = inputs.letterbox
    t = Timings()
    for b in range(batches):
        items: list[_Item] = []
        for j in range(per_batch):  # rounds: the j-th frame of every camera
            step = b * per_batch + j
            now = step / fps
            for k, cam in enumerate(names):
                idx = (k * offset + (step // hold * hold if k % 2 else step)) % n
                sig = inputs.signatures[idx]
                ref, _ = tr.reference_state(cam)
                scores = None if ref is None else tile_scores(sig, ref, cpt)  # the device's work
                t0 = time.perf_counter()
                v = tr.plan(cam, sig, lb, now, scores=scores)
                t.plan_s += time.perf_counter() - t0
                items.append(_Item(Frame(cam, step, now, now, jpeg=b"-"), v, idx))
        t0 = time.perf_counter()
        placements, canvases, n_full = fit_regions(items, size, capacity, tr)
        t.fit_s += time.perf_counter() - t0
        end = (b * per_batch + per_batch) / fps
        for it in items:
            fresh = _fresh(inputs.boxes[it.index], it.verdict, lb)
            t0 = time.perf_counter()
            out, age = tr.resolve(it.frame.camera, it.verdict, fresh, lb, end)
            t.resolve_s += time.perf_counter() - t0
            t.decisions[it.verdict.decision.value] = t.decisions.get(it.verdict.decision.value, 0) + 1
            if trace is not None:
                trace.append(repr((it.frame.camera, it.frame.seq, it.verdict, placements.get(id(it)), out, age)))
        t.frames += len(items)
        t.batches += 1
        if trace is not None:
            trace.append(repr((b, canvases, n_full)))
            for cam in names:
                st = tr.export_state(cam, end, wait_s=0.0)
                ref_bytes = b"" if st.signature is None else bytes(np.asarray(st.signature).tobytes())
                trace.append(repr((cam, st.policy, st.noise_floor, st.last_inferred, st.detections,
                                   hashlib.sha256(ref_bytes).hexdigest())))
    return t


def inputs_digest(inputs: ReplayInputs) -> str:
    """What the replay starts from: the signatures (OpenCV's decode and resize on this machine) and the boxes."""
    h = hashlib.sha256()
    for sig in inputs.signatures:
        h.update(sig.tobytes())
    h.update(repr((inputs.boxes, inputs.letterbox)).encode())
    return h.hexdigest()


def digest(lines: Sequence[str]) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Scenario:
    params: DeltaParams
    batches: int
    hold: int = 1
    capacity: int = 64


# the scenarios tests/data/delta_plan_expected.json pins
SCENARIOS: dict[str, Scenario] = {
    "default": Scenario(DeltaParams(), 16),
    "tile32-margin0-align1": Scenario(DeltaParams(tile=32, margin_tiles=0, align=1, merge_gap=8), 12),
    "rechecks-ghosts": Scenario(DeltaParams(recheck_frames=4, recheck_score=0.5, ghost_frames=3,
                                            keyframe_frames=25), 12),
    "still-scenes": Scenario(DeltaParams(keyframe_frames=30), 12, hold=5),
    "no-canvas-room": Scenario(DeltaParams(), 8, capacity=24),
}
