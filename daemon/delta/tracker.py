"""Per-camera delta state: reference signature, noise floor, policy state and cached detections."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from numpy.typing import NDArray

from daemon.delta.cache import SourceRect, box_iou, merge_split
from daemon.delta.changemap import ChangeMap, NoiseFloor, change_map_of, change_maps_of, tile_scores
from daemon.delta.policy import (
    CameraDeltaState,
    Decision,
    DeltaParams,
    Rect,
    Verdict,
    advance,
    conclude,
    precheck,
    seed_boxes,
)
from daemon.delta.signature import SIGNATURE_FACTOR
from daemon.fidelity.metrics import box_iou as box_iou_matrix
from daemon.types import Detection, Letterbox

_Box4 = tuple[int, int, int, int]  # x1, y1, x2, y2 model-input pixels (a Rect, cheaper to make)
LABEL_SCORE = 0.5  # a published label at least this sure is not renamed by a crop (see _known_labels)
BOX_BYTES = 64  # what one cached box costs in memory, roughly (stats)

if TYPE_CHECKING:
    from daemon.features.state import CameraState, InFlightArea

MAX_STATE_BOXES = 10_000  # more cached detections than this in an imported state: refused
MAX_SIGNATURE_SIDE = 4096  # signature cells per side
MAX_IN_FLIGHT = 4096  # plan indices: an unresolved frame older than this is forgotten (above queue_size 1000 + a
# few batches of 256 in the pipeline, so a frame really in flight is never forgotten; superseded verdicts are
# handed over with supersede(), so this only bounds frames lost to a failed stage)


def content_rect(lb: Letterbox) -> Rect:
    """The part of the model input that holds image (not padding)."""
    x1, y1 = round(lb.pad_x), round(lb.pad_y)
    return Rect(x1, y1, x1 + round(lb.src_w * lb.scale), y1 + round(lb.src_h * lb.scale))


def to_source(r: Rect, lb: Letterbox) -> SourceRect:
    return SourceRect((r.x1 - lb.pad_x) / lb.scale, (r.y1 - lb.pad_y) / lb.scale,
                      (r.x2 - lb.pad_x) / lb.scale, (r.y2 - lb.pad_y) / lb.scale)


_EPOCHS = itertools.count()
NO_RECT = Rect(0, 0, 0, 0)


@dataclass(slots=True)
class _Box:
    det: Detection  # source pixels of the (ROI) view, as resolve receives them
    born: float  # when it was inferred
    checked: int  # plan index at which it was last inferred or scheduled for a re-check
    rect: _Box4 | None = None  # to_input(det, the camera's letterbox) once asked for (_Camera.lb)


@dataclass(slots=True)
class _InFlight:
    """A planned frame not yet resolved, and what the camera's state was right after planning it (references are
    never edited in place, see ``_settle_plan``: holding one costs nothing)."""

    verdict: Verdict
    idx: int  # plan index
    reference: NDArray[np.uint8]
    policy: CameraDeltaState
    noise: float


@dataclass(frozen=True, slots=True)
class _Settled:
    """A camera's state as of its last frame resolved with every earlier frame resolved (frames planned since
    left out): what a checkpoint holds. Read-only; ``boxes``' det and born are never changed."""

    reference: NDArray[np.uint8]
    policy: CameraDeltaState
    noise: float
    boxes: tuple[_Box, ...]
    last_inferred: float


@dataclass(slots=True)
class _Camera:
    params: DeltaParams
    state: CameraDeltaState = field(default_factory=CameraDeltaState)
    noise: NoiseFloor = field(default_factory=NoiseFloor)
    reference: NDArray[np.uint8] | None = None
    boxes: list[_Box] = field(default_factory=list)
    ghosts: list[tuple[Detection, int]] = field(default_factory=list)  # vanished low-score box, re-check until
    last_inferred: float = 0.0
    force_key: bool = False
    planned: int = 0  # frames planned so far
    in_flight: list[_InFlight] = field(default_factory=list)  # planned, not yet resolved, in plan order
    settled: _Settled | None = None  # see _Settled (None: nothing resolved in order since it was configured)
    forced: InFlightArea | None = None  # inferred at the next frame on top of its change map (import_state)
    min_score: float = 0.0  # the camera's confidence threshold as last told (set_confidence)
    epoch: int = field(default_factory=lambda: next(_EPOCHS))  # new when the reference is set outside plan()
    lb: Letterbox | None = None  # the letterbox that ``content`` and the boxes' ``rect`` were worked out for
    content: Rect = NO_RECT
    below: list[_Box] = field(default_factory=list)  # fidelity runs: cached below-threshold candidates

    def geometry(self, lb: Letterbox) -> tuple[Rect, list[_Box4]]:
        """content_rect(lb) and to_input(box, lb) (as tuples) for every cached box, kept while the letterbox stays."""
        if lb is not self.lb and lb != self.lb:
            self.lb, self.content = lb, content_rect(lb)
            for b in self.boxes:
                b.rect = None
        rects = []
        for b in self.boxes:
            r = b.rect
            if r is None:
                r = b.rect = _input4(b.det, lb)
            rects.append(r)
        return self.content, rects


@dataclass(frozen=True, slots=True)
class DeltaSnapshot:
    """What one camera's delta state holds now (stats)."""

    cached_boxes: int
    ghosts: int
    reference_bytes: int  # the reference signature plus the cached boxes


def to_input(d: Detection, lb: Letterbox) -> Rect:
    """A box in source pixels -> the model-input pixels it covers."""
    return Rect(math.floor(d.x1 * lb.scale + lb.pad_x), math.floor(d.y1 * lb.scale + lb.pad_y),
                math.ceil(d.x2 * lb.scale + lb.pad_x), math.ceil(d.y2 * lb.scale + lb.pad_y))


def _input4(d: Detection, lb: Letterbox) -> _Box4:
    """to_input(d, lb) as a tuple."""
    return (math.floor(d.x1 * lb.scale + lb.pad_x), math.floor(d.y1 * lb.scale + lb.pad_y),
            math.ceil(d.x2 * lb.scale + lb.pad_x), math.ceil(d.y2 * lb.scale + lb.pad_y))


def _c4(r: Rect) -> _Box4:
    return r.x1, r.y1, r.x2, r.y2


def _forced_verdict(early: Verdict | None, forced: InFlightArea) -> Verdict | None:
    """The verdict of a frame that must infer ``forced`` on top of its change map (None: ``conclude`` decides, the
    forced regions among its seeds). A FULL verdict stays; a forced FULL makes one; a SKIP goes to ``conclude``."""
    if early is not None and early.decision is Decision.FULL:
        return early
    if forced.full:
        return Verdict(Decision.FULL, "frame in flight at the lending home")
    return None


def _in_flight_area(in_flight: Sequence[_InFlight]) -> InFlightArea | None:
    """What the frames in flight changed in the reference: None when all are SKIP (or none is in flight)."""
    from daemon.features.state import InFlightArea

    live = [e.verdict for e in in_flight if e.verdict.decision is not Decision.SKIP]
    if not live:
        return None
    if any(v.decision is Decision.FULL for v in live):
        return InFlightArea(True)
    return InFlightArea(False, tuple(r for v in live for r in v.regions))


def _found(d: Detection, fresh: Sequence[Detection], iou: float = 0.3) -> bool:
    return any(f.class_id == d.class_id and box_iou(f, d) > iou for f in fresh)


class DeltaTracker:
    """Decides per frame what to infer, and turns what was inferred into the frame's boxes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)  # notified whenever a planned frame is resolved
        self._cams: dict[str, _Camera] = {}

    def configure(self, camera: str, params: DeltaParams | None) -> None:
        """``None`` switches delta caching off for the camera (every frame FULL)."""
        with self._lock:
            if params is None:
                self._cams.pop(camera, None)
            elif camera in self._cams:
                self._cams[camera].params = params
            else:
                self._cams[camera] = _Camera(params, noise=NoiseFloor(k=params.noise_k,
                                                                      min_threshold=params.min_threshold))

    def request_keyframe(self, camera: str) -> bool:
        with self._lock:
            cam = self._cams.get(camera)
            if cam is not None:
                cam.force_key = True
            return cam is not None

    def set_confidence(self, camera: str, confidence: float) -> None:
        """The camera's confidence threshold changed at run time: cached boxes at or below a raised threshold go
        at once; a lowered one asks for a keyframe (boxes between the two thresholds may be anywhere)."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return
            if confidence < cam.min_score:
                cam.force_key = True
            cam.min_score = confidence
            cam.boxes = [b for b in cam.boxes if b.det.score > confidence]
            snap = cam.settled
            if snap is not None:
                cam.settled = replace(snap, boxes=tuple(b for b in snap.boxes if b.det.score > confidence))

    def enabled(self, camera: str) -> bool:
        with self._lock:
            return camera in self._cams

    def snapshot(self, camera: str) -> DeltaSnapshot | None:
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return None
            ref = 0 if cam.reference is None else int(cam.reference.nbytes)
            return DeltaSnapshot(len(cam.boxes), len(cam.ghosts), ref + BOX_BYTES * (len(cam.boxes) + len(cam.ghosts)))

    def has_reference(self, camera: str) -> bool:
        with self._lock:
            cam = self._cams.get(camera)
            return cam is not None and cam.reference is not None

    def reference_epoch(self, camera: str) -> int:
        """Changes whenever the reference stops following plan() alone (none yet, reconfigured, imported): a
        device copy of the reference (daemon.gpu.changemap) is valid while this stays the same."""
        with self._lock:
            cam = self._cams.get(camera)
            return -1 if cam is None or cam.reference is None else cam.epoch

    def reference_state(self, camera: str) -> tuple[NDArray[np.uint8] | None, int]:
        """A copy of the reference and its epoch, read together (see ``reference_epoch``)."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None or cam.reference is None:
                return None, -1
            return cam.reference.copy(), cam.epoch

    def cells_per_tile(self, camera: str) -> int:
        with self._lock:
            cam = self._cams.get(camera)
            return (cam.params.tile if cam is not None else DeltaParams().tile) // SIGNATURE_FACTOR

    def plan(self, camera: str, signature: NDArray[np.uint8], lb: Letterbox, now: float,
             scores: tuple[NDArray[np.float32], float] | None = None) -> Verdict:
        """The decision for this frame. ``scores``: its tile scores and brightness shift against the reference,
        computed elsewhere (daemon.gpu.changemap, on the device) instead of here from ``signature``."""
        return self.plan_round([camera], [signature], [lb], now, [scores])[0]

    def plan_round(self, cameras: Sequence[str], signatures: Sequence[NDArray[np.uint8]],
                   letterboxes: Sequence[Letterbox], now: float,
                   scores: Sequence[tuple[NDArray[np.float32], float] | None] | None = None) -> list[Verdict]:
        """``plan`` for one frame of each of several cameras (a camera at most once), the same verdicts and state
        as planning them one after another: the change maps and the changed-tile groups of all of them are worked
        out together (daemon.delta.changemap.change_maps_of, daemon.delta.policy.seed_boxes)."""
        n = len(cameras)
        if len(set(cameras)) != n:
            raise ValueError(f"plan_round: a camera appears twice in {list(cameras)}")
        with self._lock:
            cams = [self._cams.get(c) for c in cameras]
            cmaps = self._change_maps(cams, signatures, scores)
            out: list[Verdict | None] = [None] * n
            late: dict[tuple[tuple[int, ...], int, int], list[int]] = {}  # frames that need regions, grouped
            work: list[tuple[int, CameraDeltaState, Rect, list[_Box4], list[_Box4]]] = []
            for k, cam in enumerate(cams):
                if cam is None:
                    out[k] = Verdict(Decision.FULL, "delta off")
                    continue
                p = cam.params
                cam.planned += 1
                idx = cam.planned
                state = CameraDeltaState() if cam.force_key else cam.state
                cam.force_key = False
                content, rects = cam.geometry(letterboxes[k])
                due: list[_Box4] = []
                if cam.boxes:
                    for b, r in zip(cam.boxes, rects, strict=True):
                        period = 1 if b.det.score < p.recheck_score else p.recheck_frames
                        if period > 0 and idx - b.checked >= period:
                            due.append(r)
                if cam.ghosts:
                    cam.ghosts = [(g, until) for g, until in cam.ghosts if until >= idx]
                    due.extend(_input4(g, letterboxes[k]) for g, _ in cam.ghosts)
                cmap = cmaps[k]
                out[k] = precheck(state, cmap, now, p, len(due))
                if cam.forced is not None:
                    out[k] = _forced_verdict(out[k], cam.forced)
                work.append((k, state, content, rects, due))
                if out[k] is None and cmap is not None and cmap.n_changed:
                    late.setdefault((cmap.changed.shape, p.tile, p.margin_tiles), []).append(k)
            seeds: dict[int, list[_Box4]] = {}
            for (_shape, tile, margin), ks in late.items():
                maps = np.stack([cast("ChangeMap", cmaps[k]).changed for k in ks]) if len(ks) > 1 else \
                    cast("ChangeMap", cmaps[ks[0]]).changed[None]
                got = seed_boxes(maps, tile, margin, [_c4(cast("_Camera", cams[k]).content) for k in ks])
                seeds.update(zip(ks, got, strict=True))
            for k, state, content, rects, due in work:
                cam, cmap = cast("_Camera", cams[k]), cmaps[k]
                verdict = out[k]
                if verdict is None:
                    seed = seeds.get(k, [])
                    if cam.forced is not None:  # the lent frames' areas, on top of what the change map says
                        seed = [*seed, *(_c4(r) for r in cam.forced.regions)]
                    verdict = out[k] = conclude(cast("ChangeMap", cmap).n_changed, seed, rects, due,
                                                cam.params, _c4(content))
                cam.forced = None
                self._settle_plan(cam, verdict, state, cmap, signatures[k], rects, now)
            return cast("list[Verdict]", out)

    def _change_maps(self, cams: Sequence[_Camera | None], signatures: Sequence[NDArray[np.uint8]],
                     scores: Sequence[tuple[NDArray[np.float32], float] | None] | None) -> list[ChangeMap | None]:
        """Each frame's change map against its camera's reference (None: no usable reference), scored here where
        ``scores`` does not give it; frames with scores of one shape are thresholded together."""
        got: list[tuple[NDArray[np.float32], float] | None] = [None] * len(cams)
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, cam in enumerate(cams):
            sig = signatures[k]
            if cam is None or cam.reference is None or cam.reference.shape != sig.shape:
                continue
            sc = None if scores is None else scores[k]
            cpt = cam.params.tile // SIGNATURE_FACTOR
            if sc is None or sc[0].shape != (sig.shape[0] // cpt, sig.shape[1] // cpt):  # none, or scored with the
                sc = tile_scores(sig, cam.reference, cpt)  # tile size before a reload changed it: scored here
            got[k] = sc
            groups.setdefault(sc[0].shape, []).append(k)
        out: list[ChangeMap | None] = [None] * len(cams)
        for ks in groups.values():
            if len(ks) == 1:  # one frame (the CPU path): its own change map, no stacking
                k = ks[0]
                sc = cast("tuple[NDArray[np.float32], float]", got[k])
                out[k] = change_map_of(sc[0], sc[1], cast("_Camera", cams[k]).noise)
                continue
            part = [cast("tuple[NDArray[np.float32], float]", got[k]) for k in ks]
            maps = change_maps_of(np.stack([sc[0] for sc in part]), [sc[1] for sc in part],
                                  [cast("_Camera", cams[k]).noise for k in ks])
            for k, m in zip(ks, maps, strict=True):
                out[k] = m
        return out

    @staticmethod
    def _settle_plan(cam: _Camera, verdict: Verdict, state: CameraDeltaState, cmap: ChangeMap | None,
                     signature: NDArray[np.uint8], rects: list[_Box4], now: float) -> None:
        """The camera's state after planning a frame as ``verdict``: policy state, reference, boxes' checks."""
        idx = cam.planned
        cam.state = advance(state, verdict, cmap, now)
        if verdict.decision is Decision.FULL or cam.reference is None:
            cam.reference = signature.copy()
            for b in cam.boxes:
                b.checked = idx
        elif verdict.decision is Decision.REGIONS:
            f = SIGNATURE_FACTOR
            ref = cam.reference = cam.reference.copy()  # a new array, never an edit: settled states share the old
            for g in verdict.regions:
                ys, xs = slice(g.y1 // f, g.y2 // f), slice(g.x1 // f, g.x2 // f)
                ref[ys, xs] = signature[ys, xs]
            regs = [(g.x1, g.y1, g.x2, g.y2) for g in verdict.regions]
            for b, (x1, y1, x2, y2) in zip(cam.boxes, rects, strict=True):
                for gx1, gy1, gx2, gy2 in regs:  # the box wholly inside a region: seen again
                    if gx1 <= x1 and x2 <= gx2 and gy1 <= y1 and y2 <= gy2:
                        b.checked = idx
                        break
        # a verdict replaced on the way (none resolved under this one) must not hold exports back for ever
        if cam.in_flight and idx - cam.in_flight[0].idx >= MAX_IN_FLIGHT:
            cam.in_flight = [e for e in cam.in_flight if idx - e.idx < MAX_IN_FLIGHT]
        cam.in_flight.append(_InFlight(verdict, idx, cam.reference, cam.state, cam.noise.value))

    def supersede(self, camera: str, old: Verdict, new: Verdict) -> None:
        """The pipeline processes a planned frame under ``new`` instead of ``old`` (a REGIONS frame that found no
        canvas room goes FULL): the frame in flight is now the one ``new`` resolves."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return
            for e in cam.in_flight:
                if e.verdict is old:
                    e.verdict = new
                    break

    def resolve(self, camera: str, verdict: Verdict, fresh: Sequence[Detection], lb: Letterbox,
                now: float, whole_frame: bool = False,
                cut: Sequence[Detection] = ()) -> tuple[tuple[Detection, ...], float]:
        """The boxes to publish for this frame, and the age of the oldest information they rest on.

        ``cut``: the crops' boxes that a crop edge inside the image cut (not in ``fresh``). With ``keep_cut``, a
        cached box under one (its class, IoU > 0.3) that no fresh box took over stays as it was, also when it lies
        wholly inside a region: the crop saw the object, only not whole (without this the object vanished until a
        crop saw it whole again, in vtest a person scoring 0.8-0.9). With ``label_iou``, see ``_known_labels``."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return tuple(fresh), 0.0
            idx = cam.planned
            entry: _InFlight | None = None
            for k, e in enumerate(cam.in_flight):
                if e.verdict is verdict:  # identity: the frame planned with this verdict is settled
                    idx, entry = e.idx, e
                    del cam.in_flight[k]
                    self._settled.notify_all()
                    break
            first = entry is not None and (not cam.in_flight or cam.in_flight[0].idx > entry.idx)
            fresh = [d for d in fresh if d.score > cam.min_score]
            old = cam.boxes
            if verdict.decision is Decision.FULL or whole_frame:  # whole_frame: features mode saw the whole frame
                cam.boxes = [_Box(d, now, idx) for d in fresh]
                cam.last_inferred = now
            elif verdict.decision is Decision.REGIONS:
                px, py, s = lb.pad_x, lb.pad_y, lb.scale  # to_source(r, lb) of each region
                rs = [((r.x1 - px) / s, (r.y1 - py) / s, (r.x2 - px) / s, (r.y2 - py) / s) for r in verdict.regions]
                p = cam.params
                held: list[int] = []
                if p.label_iou > 0 and old:
                    fresh, held = _known_labels(fresh, [b.det for b in old], p.label_iou)
                stay, seen = merge_split([b.det for b in old], fresh, rs)
                if p.keep_cut and cut:
                    held += [k for k, b in enumerate(old) if _found(b.det, cut) and not _found(b.det, seen)]
                if held:
                    stay = sorted(set(stay).union(held))
                cam.boxes = [old[k] for k in stay]
                cam.boxes += [_Box(d, now, idx) for d in seen]
            if verdict.decision is not Decision.SKIP and cam.params.ghost_frames > 0:
                kept = {id(b.det) for b in cam.boxes}
                for b in old:
                    d = b.det
                    if id(d) not in kept and d.score < cam.params.recheck_score and not _found(d, fresh):
                        cam.ghosts = [(g, u) for g, u in cam.ghosts
                                      if not (g.class_id == d.class_id and box_iou(g, d) > 0.5)]
                        cam.ghosts.append((d, idx + cam.params.ghost_frames))
            if first and entry is not None:  # every frame planned before it is resolved: a settled state
                cam.settled = _Settled(entry.reference, entry.policy, entry.noise, tuple(cam.boxes), cam.last_inferred)
            out = tuple(_aged(b.det, now - b.born) for b in cam.boxes)
            return out, now - cam.last_inferred

    def resolve_below(self, camera: str, verdict: Verdict, below: Sequence[Detection], fresh: Sequence[Detection],
                      lb: Letterbox, now: float, whole_frame: bool = False) -> tuple[Detection, ...]:
        """Fidelity runs only (CameraSettings.rank_floor): the frame's below-threshold candidates, cached by the
        plain region rule (a FULL frame replaces them; in a REGIONS frame a cached one stays unless it lies wholly
        inside a processed region or a fresh box of its class, published or below, covers it; a SKIP frame keeps
        them). Call after ``resolve`` for the same frame."""
        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                return tuple(below)
            if verdict.decision is Decision.FULL or whole_frame:
                cam.below = [_Box(d, now, 0) for d in below]
            elif verdict.decision is Decision.REGIONS and verdict.regions:
                px, py, s = lb.pad_x, lb.pad_y, lb.scale
                rs = np.asarray([((r.x1 - px) / s, (r.y1 - py) / s, (r.x2 - px) / s, (r.y2 - py) / s)
                                 for r in verdict.regions], np.float64)
                stay = _below_stays([b.det for b in cam.below], [*fresh, *below], rs)
                cam.below = [b for b, k in zip(cam.below, stay, strict=True) if k] + [_Box(d, now, 0) for d in below]
            return tuple(_aged(b.det, now - b.born) for b in cam.below)

    # -- state moves (daemon.features.state format) -------------------------------------------------------
    def export_state(self, camera: str, now: float, wait_s: float = 1.0, model_sha256: str = "",
                     features: tuple[Any, ...] | Callable[[], tuple[Any, ...]] = ()) -> CameraState:
        """The camera's reference state. Waits up to ``wait_s`` for frames in flight to be resolved; if one still
        is, the state says "no reference" (policy counters), so an importer that ignores ``in_flight`` starts with
        a FULL frame, and ``in_flight`` says where those frames changed the reference without their detections
        being in the state yet (an importer infers there first: import_state). Raises StateError when delta
        caching is off for the camera."""
        from daemon.features.state import CameraState, StateError

        deadline = time.monotonic() + wait_s
        with self._settled:
            cam = self._cams.get(camera)
            while cam is not None and cam.in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._settled.wait(left)
                cam = self._cams.get(camera)
            if cam is None:
                raise StateError(f"camera {camera!r}: delta caching is off, there is no state to export")
            policy = cam.state if not cam.in_flight and cam.reference is not None else CameraDeltaState()
            feats = features() if callable(features) else features  # read after the wait: the settled frame's
            return CameraState(
                camera=camera, signature=None if cam.reference is None else cam.reference.copy(),
                features=tuple(feats), detections=tuple(_aged(b.det, now - b.born) for b in cam.boxes),
                policy=policy, noise_floor=cam.noise.value, last_inferred=cam.last_inferred, now=now,
                model_sha256=model_sha256, in_flight=_in_flight_area(cam.in_flight),
            )

    def settled_state(self, camera: str, now: float, model_sha256: str = "") -> CameraState | None:
        """The camera's state as of its last frame resolved after every earlier one (frames planned since are left
        out: exactly what a tracker fed only up to that frame would export), without waiting and without copying
        under the lock: the reference is shared (never edited in place), the rest is built outside. None until a
        frame was resolved so (or a settled state imported). Raises StateError when delta caching is off."""
        from daemon.features.state import CameraState, StateError

        with self._lock:
            cam = self._cams.get(camera)
            if cam is None:
                raise StateError(f"camera {camera!r}: delta caching is off, there is no state to export")
            snap = cam.settled
        if snap is None:
            return None
        return CameraState(
            camera=camera, signature=snap.reference, features=(),
            detections=tuple(_aged(b.det, now - b.born) for b in snap.boxes), policy=snap.policy,
            noise_floor=snap.noise, last_inferred=snap.last_inferred, now=now, model_sha256=model_sha256,
        )

    def import_state(self, camera: str, state: CameraState, now: float) -> None:
        """Install an exported state (clock values already rebased to ours). Raises StateError, changing nothing,
        when delta caching is off for the camera or the state is not sound."""
        from daemon.features.state import StateError

        if state.camera != camera:
            raise StateError(f"state of camera {state.camera!r} offered to camera {camera!r}")
        sig = state.signature
        if sig is not None:
            sig = np.asarray(to_host_array(sig))
            if sig.ndim != 2 or sig.dtype != np.uint8 or max(sig.shape) > MAX_SIGNATURE_SIDE or min(sig.shape) < 1:
                raise StateError(f"camera {camera!r}: signature of shape {sig.shape} {sig.dtype} is not usable")
        if len(state.detections) > MAX_STATE_BOXES:
            raise StateError(f"camera {camera!r}: {len(state.detections)} cached detections (limit {MAX_STATE_BOXES})")
        bad = next((d for d in state.detections
                    if not all(map(math.isfinite, (d.score, d.x1, d.y1, d.x2, d.y2, d.age_s)))), None)
        if bad is not None:  # a NaN corner in the cache stops plan() (to_input floors it)
            raise StateError(f"camera {camera!r}: a cached detection is not finite: {bad}")
        with self._settled:
            cam = self._cams.get(camera)
            if cam is None:
                raise StateError(f"camera {camera!r}: delta caching is off, the state cannot be installed")
            cam.reference = None if sig is None else sig.copy()
            cam.epoch = next(_EPOCHS)
            cam.state = state.policy if sig is not None else CameraDeltaState()
            cam.noise.value = float(state.noise_floor)
            cam.boxes = [_Box(replace(d, cached=False, age_s=0.0), now - d.age_s, cam.planned)
                         for d in state.detections]
            cam.ghosts = []
            cam.last_inferred = state.last_inferred
            cam.in_flight = []
            cam.force_key = sig is None
            cam.forced = state.in_flight if sig is not None else None
            cam.settled = None if cam.reference is None or cam.forced is not None else \
                _Settled(cam.reference, cam.state, cam.noise.value, tuple(cam.boxes), cam.last_inferred)


def to_host_array(a: Any) -> Any:
    """A numpy view of a numpy or CuPy array."""
    get = getattr(a, "get", None)
    return get() if callable(get) and not isinstance(a, np.ndarray) else a


def _known_labels(fresh: Sequence[Detection], old: Sequence[Detection],
                  iou: float) -> tuple[list[Detection], list[int]]:
    """A crop does not rename a known object. A fresh box over a cached box of another class scoring at least
    ``LABEL_SCORE`` (IoU >= ``iou``: the same object, not moved) where no cached box had its own class (IoU >= 0.5)
    is dropped, and that cached box stays where no fresh box of its class covers it any more. A crop sees an
    object with less context than the whole frame and may name it otherwise (the parked van in vtest: "truck"
    0.6-0.74 in the whole frame, "car" 0.3-0.66 with or without "truck" in crops); the next FULL frame decides.
    A known label below ``LABEL_SCORE`` is no better evidence than the crop's (vtest's other parked vehicle flips
    between "car" and "truck" at 0.26-0.55 in the whole frame itself) and is renamed as before. Returns the fresh
    boxes that count and the indices of the cached boxes to keep."""
    out: list[Detection] = []
    keep: list[int] = []
    for b in fresh:
        c = b.class_id
        twins = [k for k, o in enumerate(old) if o.class_id != c and o.score >= LABEL_SCORE and box_iou(o, b) >= iou]
        if not twins or any(o.class_id == c and box_iou(o, b) >= 0.5 for o in old):
            out.append(b)
            continue
        keep += [k for k in twins if not any(f.class_id == old[k].class_id and box_iou(f, old[k]) >= 0.5
                                             for f in fresh)]
    return out, keep


def _below_stays(old: Sequence[Detection], fresh: Sequence[Detection], rs: NDArray[np.float64]) -> list[bool]:
    """``merge_split``'s rule for the cached below-threshold candidates, in arrays (a frame holds ~150 of them at
    conf 0.001): a cached one stays unless it lies wholly inside a region or a fresh box of its class whose centre
    is in a region covers it (IoU > 0.3). ``rs``: (R, 4) regions in the same pixels."""
    if not old:
        return []
    o = np.asarray([(d.x1, d.y1, d.x2, d.y2, d.class_id) for d in old], np.float64)
    inside = np.any((rs[None, :, 0] <= o[:, None, 0]) & (o[:, None, 2] <= rs[None, :, 2])
                    & (rs[None, :, 1] <= o[:, None, 1]) & (o[:, None, 3] <= rs[None, :, 3]), axis=1)
    if fresh:
        f = np.asarray([(d.x1, d.y1, d.x2, d.y2, d.class_id) for d in fresh], np.float64)
        cx, cy = (f[:, 0] + f[:, 2]) / 2, (f[:, 1] + f[:, 3]) / 2
        f = f[((rs[None, :, 0] <= cx[:, None]) & (cx[:, None] < rs[None, :, 2])
               & (rs[None, :, 1] <= cy[:, None]) & (cy[:, None] < rs[None, :, 3])).any(axis=1)]
        if len(f):
            iou = box_iou_matrix(o[:, :4], f[:, :4])
            inside = inside | np.any((iou > 0.3) & (o[:, None, 4] == f[None, :, 4]), axis=1)
    return [not v for v in inside.tolist()]


def _aged(d: Detection, age: float) -> Detection:
    if age <= 0:
        return d
    return Detection(d.class_id, d.class_name, d.score, d.x1, d.y1, d.x2, d.y2, cached=True, age_s=age)


def params_from_config(cfg: object) -> DeltaParams | None:
    """A DeltaConfig section -> DeltaParams, or None when delta caching is off."""
    from daemon.config.model import DeltaConfig

    if not isinstance(cfg, DeltaConfig) or not cfg.enabled:
        return None
    return DeltaParams(
        tile=cfg.tile, keyframe_frames=cfg.keyframe_frames, keyframe_s=cfg.keyframe_s,
        full_fraction=cfg.full_fraction, brightness_full=cfg.brightness_full, drift_tiles=cfg.drift_tiles,
        margin_tiles=cfg.margin_tiles, max_regions=cfg.max_regions, max_area_fraction=cfg.max_area_fraction,
        noise_k=cfg.noise_k, min_threshold=cfg.min_threshold, context_px=cfg.context_px,
        recheck_frames=cfg.recheck_frames, recheck_score=cfg.recheck_score, ghost_frames=cfg.ghost_frames,
        merge_gap=cfg.merge_gap, align=cfg.align, label_iou=cfg.label_iou, keep_cut=cfg.keep_cut,
    )
