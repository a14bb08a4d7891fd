"""A repeatable replay of delta caching's host work (plan, fit_regions, resolve) for many cameras, as the GPU
path does it per batch: tools/delta_plan_bench.py times it, tests/test_delta_plan_equality.py pins its outputs.

Inputs are real: vtest's luma signatures, tile scores against each camera's reference computed on the host with
the arithmetic the device uses (daemon.delta.changemap.tile_scores; not timed, the device does it), and YOLOv8n
detections of each vtest frame recorded once (tests/data/delta_plan_inputs.json). Camera k replays the recorded
frames from frame ``k * offset`` on, wrapping round; a batch holds ``per_batch`` consecutive frames of every
camera, planned in rounds (daemon.gpu.prepare.planning_rounds), packed with fit_regions (or laid out by the GPU
preparer's host side, daemon.gpu.prepare.lay_out, which needs no device) and then resolved. A REGIONS frame's
fresh boxes are the recorded boxes whose centre lies in one of its regions.

``replay_post`` replays the post stage too (daemon.pipeline.post: decoded rows -> each frame's published boxes):
the rows the detector would return for the FULL rows and the region canvases are made from the recorded boxes
(those on a crop, cut by its edges, some shifted across them, low-score and foreign-class copies).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from numpy.typing import NDArray

from daemon.delta.changemap import tile_scores
from daemon.delta.policy import Decision, DeltaParams, Rect, Verdict
from daemon.delta.signature import SIGNATURE_FACTOR, luma_signature
from daemon.delta.tracker import DeltaTracker, to_source
from daemon.pipeline.settings import CameraSettings
from daemon.types import Detection, Frame, Letterbox

if TYPE_CHECKING:
    from daemon.pipeline.post import PostFactory
    from daemon.pipeline.prepare import Prepared

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
    fit_s: float = 0.0  # fit_regions (with ``gpu_layout``: daemon.gpu.prepare.lay_out, fit_regions inside it)
    resolve_s: float = 0.0
    post_s: float = 0.0  # replay_post: decoded rows -> published boxes (resolve included)
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
           trace: list[str] | None = None, per_frame: bool = False, gpu_layout: bool = False) -> Timings:
    """Run the replay (each round planned with one DeltaTracker.plan_round call, as the GPU path does; with
    ``per_frame``, one DeltaTracker.plan call per frame, as the CPU path does); ``trace`` (when given) gets one
    canonical line per frame and one per batch end (the
    cameras' exported states), everything the decisions and outputs consist of. ``hold``: odd cameras show each
    of their frames ``hold`` times (a still scene between changes: SKIP frames). ``gpu_layout``: the batch is
    laid out by the GPU preparer's host side (daemon.gpu.prepare.lay_out: fit_regions, then each frame's rows,
    crops and Prepared item) instead of fit_regions alone; the placements traced are read from its items."""
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
            idxs = [(k * offset + (step // hold * hold if k % 2 else step)) % n for k in range(cameras)]
            sigs = [inputs.signatures[i] for i in idxs]
            scores = []
            for cam, sig in zip(names, sigs, strict=True):
                ref, _ = tr.reference_state(cam)
                scores.append(None if ref is None else tile_scores(sig, ref, cpt))  # the device's work
            t0 = time.perf_counter()
            if per_frame:
                verdicts = [tr.plan(cam, sig, lb, now, scores=sc) for cam, sig, sc in zip(names, sigs, scores,
                                                                                          strict=True)]
            else:
                verdicts = tr.plan_round(names, sigs, [lb] * cameras, now, scores)
            t.plan_s += time.perf_counter() - t0
            items += [_Item(Frame(cam, step, now, now, jpeg=b"-"), v, i)
                      for cam, v, i in zip(names, verdicts, idxs, strict=True)]
        if gpu_layout:
            placements, canvases, n_full = _gpu_layout(items, tr, lb, size, capacity, t)
        else:
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


def _gpu_layout(items: list[_Item], tracker: DeltaTracker, lb: Letterbox, size: int, capacity: int, t: Timings
                ) -> tuple[dict[int, list[tuple[int, int, int, Rect]]], int, int]:
    """The batch through daemon.gpu.prepare.lay_out (timed into ``t.fit_s``), as fit_regions' outputs."""
    from daemon.gpu.prepare import DecodedRow, lay_out

    rows = [DecodedRow(it.frame, lb, lb.src_w, lb.src_h, it.verdict, k) for k, it in enumerate(items)]
    t0 = time.perf_counter()
    lay = lay_out(rows, size, capacity, tracker, None, 0.0)
    t.fit_s += time.perf_counter() - t0
    placements: dict[int, list[tuple[int, int, int, Rect]]] = {}
    for it, row, pr in zip(items, rows, lay.items, strict=True):
        it.verdict = row.verdict  # a frame that found no canvas room went FULL
        if pr.verdict.decision is Decision.REGIONS:
            placements[id(it)] = [(p.slot - lay.n_full, p.x, p.y, p.region) for p in pr.placements]
    return placements, lay.canvases, lay.n_full


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


POST_CAMERAS = 16  # camera 15 has delta caching off; cameras 1, 5, ...: conf 0.4; 2, 6, ...: persons only;
# 3, 7, ...: at most 3 boxes; camera 4 has a ROI offset


def post_settings(camera: int) -> CameraSettings:
    kind = camera % 4
    return CameraSettings(f"cam{camera:02d}", 0.4 if kind == 1 else 0.25, 0.7, 3 if kind == 3 else 100,
                          frozenset({0}) if kind == 2 else None, None, ())


def _model_rows(boxes: Sequence[Box], lb: Letterbox) -> NDArray[np.float32]:
    """Recorded boxes in model-input pixels: (n, 6) x1, y1, x2, y2, score, class (float32)."""
    out = np.zeros((len(boxes), 6), np.float32)
    for k, (c, _n, s, x1, y1, x2, y2) in enumerate(boxes):
        out[k] = (x1 * lb.scale + lb.pad_x, y1 * lb.scale + lb.pad_y, x2 * lb.scale + lb.pad_x,
                  y2 * lb.scale + lb.pad_y, s, c)
    return out


def _on_crop(rows: NDArray[np.float32], x1: int, y1: int, x2: int, y2: int, px: int, py: int,
             rng: np.random.Generator) -> list[NDArray[np.float32]]:
    """What a detector finds on a crop [x1, x2) x [y1, y2) placed at (px, py): the boxes cut by the crop, some
    shifted across its edges, low-score and foreign-class copies."""
    out = []
    for b in rows:
        ix1, iy1, ix2, iy2 = max(b[0], x1), max(b[1], y1), min(b[2], x2), min(b[3], y2)
        if ix2 <= ix1 or iy2 <= iy1:
            continue
        c = np.array([ix1 - x1 + px, iy1 - y1 + py, ix2 - x1 + px, iy2 - y1 + py, b[4], b[5]], np.float32)
        out.append(c)
        roll = int(rng.integers(0, 6))
        if roll == 0:  # shifted by half its size: its centre may leave the crop
            d = c.copy()
            d[[0, 2]] += (d[2] - d[0]) / 2 * (1 if rng.integers(0, 2) else -1)
            d[[1, 3]] += (d[3] - d[1]) / 2 * (1 if rng.integers(0, 2) else -1)
            out.append(d)
        elif roll == 1:
            out.append(np.array([*c[:4], c[4] * 0.5, c[5]], np.float32))
        elif roll == 2:
            out.append(np.array([*c[:4], c[4] * 0.9, 2.0 if c[5] == 0 else 0.0], np.float32))
    return out


def _decoded_rows(items: Sequence[Prepared], boxes: Sequence[Sequence[Box]], lb: Letterbox, rows: int,
                  rng: np.random.Generator) -> list[NDArray[np.float32]]:
    parts: list[list[NDArray[np.float32]]] = [[] for _ in range(rows)]
    for it, bx in zip(items, boxes, strict=True):
        m = _model_rows(bx, lb)
        if it.slot >= 0:
            parts[it.slot].extend(_on_crop(m, 0, 0, 640, 640, 0, 0, rng))
        for p in it.placements:
            r = p.region
            parts[p.slot].extend(_on_crop(m, r.x1, r.y1, r.x2, r.y2, p.x, p.y, rng))
    out = []
    for ps in parts:
        a = np.stack(ps) if ps else np.zeros((0, 6), np.float32)
        out.append(a[np.argsort(-a[:, 4], kind="stable")])
    return out


def replay_post(inputs: ReplayInputs, params: DeltaParams, batches: int, factory: PostFactory,
                per_batch: int = 4, offset: int = 15, fps: float = 10.0, capacity: int = 64, size: int = 640,
                hold: int = 1, trace: list[str] | None = None) -> Timings:
    """The replay through the post stage: plan, fit_regions, the items as the GPU preparer makes them, decoded
    rows made from the recorded boxes, then ``factory`` (the post stage) for each frame, timed."""
    from daemon.pipeline.prepare import Placement, Prepared, fit_regions

    tr = DeltaTracker()
    names = [f"cam{k:02d}" for k in range(POST_CAMERAS)]
    settings = {n: post_settings(k) for k, n in enumerate(names)}
    for cam in names[:-1]:
        tr.configure(cam, params)
        tr.set_confidence(cam, settings[cam].confidence)
    class_names = [f"c{i}" for i in range(80)]
    n = len(inputs.signatures)
    cpt = params.tile // SIGNATURE_FACTOR
    lb = inputs.letterbox
    rng = np.random.default_rng(11)
    t = Timings()
    for b in range(batches):
        items: list[_Item] = []
        for j in range(per_batch):
            step = b * per_batch + j
            now = step / fps
            for k, cam in enumerate(names):
                idx = (k * offset + (step // hold * hold if k % 2 else step)) % n
                sig = inputs.signatures[idx]
                ref, _ = tr.reference_state(cam)
                scores = None if ref is None else tile_scores(sig, ref, cpt)
                items.append(_Item(Frame(cam, step, now, now, jpeg=b"-"), tr.plan(cam, sig, lb, now, scores=scores),
                                   idx))
        placements, canvases, n_full = fit_regions(items, size, capacity, tr)
        prepared: list[Prepared] = []
        row = 0
        for it in items:
            v = it.verdict
            slot, own = -1, cast("tuple[Placement, ...]", ())
            if v.decision is Decision.FULL:
                slot, row = row, row + 1
            elif v.decision is Decision.REGIONS:
                own = tuple(Placement(n_full + c, x, y, r) for (c, x, y, r) in placements[id(it)])
            off = (16, 8) if it.frame.camera == "cam04" else (0, 0)
            prepared.append(Prepared(it.frame, v, slot, own, lb, off, lb.src_w, lb.src_h, 0, 0.0,
                                     1.0 if slot >= 0 else 0.5, None))
        decoded = _decoded_rows(prepared, [inputs.boxes[it.index] for it in items], lb, n_full + canvases, rng)
        end = (b * per_batch + per_batch) / fps
        t0 = time.perf_counter()
        post = factory(prepared, decoded, settings.get, class_names, tr, partial(float, end))
        got = [post(k) for k in range(len(prepared))]
        t.post_s += time.perf_counter() - t0
        for pr, (dets, age) in zip(prepared, got, strict=True):
            t.decisions[pr.verdict.decision.value] = t.decisions.get(pr.verdict.decision.value, 0) + 1
            if trace is not None:
                trace.append(repr((pr.frame.camera, pr.frame.seq, pr.verdict.decision.value, dets, age)))
        t.frames += len(items)
        t.batches += 1
    return t
