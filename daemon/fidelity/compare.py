"""Run a reference and a candidate model on the same frames, through the live pipeline's preprocessing and our
decode/NMS, and report the candidate's fidelity (reference detections as ground truth), bytes and CPU speed.

Both models run frame by frame, interleaved (reference, candidate, next frame...), so a busy shared machine
slows both alike. Frames the candidate was calibrated on (listed in its ``deltayolo.quant`` metadata) are left
out: fidelity is measured on held-out frames only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.fidelity.metrics import MIN_OBJECTS, DetectionMetrics, evaluate
from daemon.inference.yolo import decode_output, to_detections
from daemon.quant.frames import DEFAULT_MAX_PIXELS, SourceFrame, prepare
from daemon.types import Letterbox

log = logging.getLogger(__name__)

RANKING_CONF = 0.001  # COCO evaluation practice


class FidelityError(Exception):
    """The comparison cannot run (models disagree on input or classes, no held-out frames...)."""


@dataclass(frozen=True, slots=True)
class ModelFigures:
    """One model's size and speed. ``infer_fps``: model only; ``pipeline_fps``: decode + letterbox + model +
    box decode/NMS, one frame at a time."""

    path: str
    sha256: str
    bytes: int
    threads: int
    infer_ms_mean: float
    infer_ms_median: float
    infer_fps: float
    pipeline_fps: float
    boxes: int


@dataclass(frozen=True, slots=True)
class FidelityReport:
    """``published``: the candidate's boxes at its deployed threshold (what a camera would publish) against the
    reference's; ``ranked``: the candidate's boxes down to ``ranking_conf`` (COCO practice: AP integrates over
    thresholds, so reference objects near the threshold whose candidate score fell just under it still count
    as found, at the rank their score gives them). Without ``ranking_conf``, ``ranked`` is None."""

    reference: ModelFigures
    candidate: ModelFigures
    frame_sources: tuple[str, ...]
    frames: int
    excluded_calibration_frames: int
    conf: float
    iou: float
    candidate_conf: float
    ranking_conf: float | None
    published: DetectionMetrics
    ranked: DetectionMetrics | None
    per_source: dict[str, dict[str, DetectionMetrics]]  # source -> {"published": ..., "ranked": ...}
    created: str

    @property
    def speedup(self) -> float:
        """Candidate model-only frames/s over the reference's."""
        return self.candidate.infer_fps / self.reference.infer_fps if self.reference.infer_fps else float("nan")

    @property
    def size_ratio(self) -> float:
        return self.candidate.bytes / self.reference.bytes if self.reference.bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["published"] = self.published.to_dict()
        d["ranked"] = self.ranked.to_dict() if self.ranked is not None else None
        d["per_source"] = {k: {kind: m.to_dict() for kind, m in v.items()} for k, v in self.per_source.items()}
        d["speedup"] = round(self.speedup, 3)
        d["size_ratio"] = round(self.size_ratio, 4)
        return d

    def write_json(self, path: Path | str) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p

    def summary(self) -> str:
        m, rk = self.published, self.ranked
        lines = [
            f"fidelity of {Path(self.candidate.path).name} vs {Path(self.reference.path).name}: {self.frames} "
            f"frames ({self.excluded_calibration_frames} calibration frames left out), reference conf {self.conf}, "
            f"iou {self.iou}; {m.ref_objects} reference objects in {len(m.classes)} classes",
            _headline(f"published (candidate conf {self.candidate_conf})", m),
        ]
        if rk is not None:
            lines.append(_headline(f"ranked (candidate conf {self.ranking_conf})", rk))
        ranked = {k.class_id: k for k in rk.classes} if rk is not None else {}
        lines.append(f"   {'class':<17} {'objects':>7} {'boxes':>6} {'AP50':>7} {'AP50-95':>7} {'recall':>7}"
                     + (f"  | ranked {'AP50':>7} {'AP50-95':>7} {'recall':>7}" if rk is not None else ""))
        for k in m.classes:
            mark = "*" if k.ref_objects >= m.min_objects else " "
            row = (f"   {mark}{k.name:<16} {k.ref_objects:7d} {k.candidate_boxes:6d} {k.ap50:7.4f} {k.ap50_95:7.4f} "
                   f"{k.recall50:7.4f}")
            if k.class_id in ranked:
                q = ranked[k.class_id]
                row += f"  |        {q.ap50:7.4f} {q.ap50_95:7.4f} {q.recall50:7.4f}"
            lines.append(row)
        if m.unmatched_classes:
            lines.append(f"   published boxes of classes the reference never saw: {m.unmatched_classes}")
        for name, kinds in self.per_source.items():
            lines.append(f"  {name}: " + "; ".join(
                f"{kind} weighted mAP50 {sm.map50_weighted:.4f} mAP50-95 {sm.map50_95_weighted:.4f}"
                for kind, sm in kinds.items()) + f" ({kinds['published'].images} frames, "
                f"{kinds['published'].ref_objects} objects)")
        r, c = self.reference, self.candidate
        lines.append(f"  size {c.bytes / 1e6:.2f} MB vs {r.bytes / 1e6:.2f} MB ({self.size_ratio:.3f}x); model "
                     f"{c.infer_fps:.1f} vs {r.infer_fps:.1f} frames/s ({self.speedup:.2f}x, {r.threads} threads); "
                     f"pipeline {c.pipeline_fps:.1f} vs {r.pipeline_fps:.1f} frames/s")
        return "\n".join(lines)


def _headline(label: str, m: DetectionMetrics) -> str:
    return (f"  {label}: object-weighted mAP50 {m.map50_weighted:.4f} mAP50-95 {m.map50_95_weighted:.4f} "
            f"recall50 {m.recall50_weighted:.4f}; class mean mAP50 {m.map50_mean:.4f} mAP50-95 "
            f"{m.map50_95_mean:.4f}; {m.candidate_boxes} boxes")


@dataclass(slots=True)
class _Run:
    engine: Any
    layout: Any
    names: tuple[str, ...]
    conf: float
    low_conf: float | None  # also keep the boxes down to this threshold (not timed)
    dets: list[NDArray[np.float32]]
    dets_low: list[NDArray[np.float32]]
    infer_s: list[float]
    post_s: list[float]


def compare_models(
    reference: Path | str,
    candidate: Path | str,
    frames: Sequence[SourceFrame],
    *,
    conf: float = 0.25,
    iou: float = 0.7,
    candidate_conf: float | None = None,
    ranking_conf: float | None = RANKING_CONF,
    threads: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_objects: int = MIN_OBJECTS,
    frame_sources: Sequence[str] = (),
) -> FidelityReport:
    """Compare on ``frames`` (less the candidate's calibration frames). ``candidate_conf`` (default ``conf``) is
    the candidate's deployed threshold; ``ranking_conf`` the low one of the ranked view (None: skip it)."""
    import datetime

    from daemon.inference.model import load_model
    from daemon.inference.onnxrt import OnnxRuntimeEngine

    ref_model, cand_model = load_model(reference), load_model(candidate)
    if ref_model.input_hw != cand_model.input_hw or ref_model.num_classes != cand_model.num_classes:
        raise FidelityError(f"{reference} takes {ref_model.input_hw} with {ref_model.num_classes} classes but "
                            f"{candidate} takes {cand_model.input_hw} with {cand_model.num_classes}")
    held_out, excluded = _held_out(Path(candidate), frames)
    if not held_out:
        raise FidelityError(f"all {len(frames)} frames were calibration frames of {candidate}: give other frames")
    c_conf = conf if candidate_conf is None else candidate_conf
    runs = [
        _Run(OnnxRuntimeEngine(m, 1, threads), m.layout, m.class_names, k, low, [], [], [], [])
        for m, k, low in ((ref_model, conf, None), (cand_model, c_conf, ranking_conf))
    ]
    prep_s: list[float] = []
    for i, frame in enumerate(held_out):
        t0 = time.perf_counter()
        p = prepare(frame, ref_model.input_hw, max_pixels)
        prep_s.append(time.perf_counter() - t0)
        for run in runs:
            _detect(run, p.tensor, p.letterbox, iou)
        if (i + 1) % 100 == 0:
            log.info("fidelity: %d/%d frames", i + 1, len(held_out))
    for run in runs:
        run.engine.close()
    names = ref_model.class_names
    ref, cand = runs
    views = {"published": cand.dets, **({"ranked": cand.dets_low} if ranking_conf is not None else {})}
    overall = {kind: evaluate(ref.dets, d, names, min_objects=min_objects) for kind, d in views.items()}
    per_source = _per_source(held_out, ref.dets, views, names, min_objects)
    figures = [_figures(Path(m.path), r, prep_s, threads) for m, r in ((ref_model, ref), (cand_model, cand))]
    return FidelityReport(
        reference=figures[0], candidate=figures[1], frame_sources=tuple(frame_sources), frames=len(held_out),
        excluded_calibration_frames=excluded, conf=conf, iou=iou, candidate_conf=c_conf,
        ranking_conf=ranking_conf, published=overall["published"], ranked=overall.get("ranked"),
        per_source=per_source, created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    )


def _held_out(candidate: Path, frames: Sequence[SourceFrame]) -> tuple[list[SourceFrame], int]:
    import onnx

    from daemon.quant.calibrate import quant_metadata

    meta = quant_metadata(onnx.load(str(candidate), load_external_data=False))
    used = set(meta.get("frames", [])) if meta else set()
    kept = [f for f in frames if f.digest not in used]
    if len(kept) < len(frames):
        log.warning("fidelity: left out %d of %d frames that %s was calibrated on", len(frames) - len(kept),
                    len(frames), candidate.name)
    return kept, len(frames) - len(kept)


def _rows(raw: NDArray[np.float32], run: _Run, conf: float, iou: float, lb: Letterbox) -> NDArray[np.float32]:
    dets = to_detections(decode_output(raw, run.layout, conf, iou)[0], lb, run.names)
    rows = np.array([(d.x1, d.y1, d.x2, d.y2, d.score, d.class_id) for d in dets], dtype=np.float32)
    return rows.reshape(-1, 6)


def _detect(run: _Run, tensor: NDArray[np.float32], lb: Letterbox, iou: float) -> None:
    """Infer one frame and keep its detections as (N, 6) rows in source pixels, as the pipeline publishes them."""
    t0 = time.perf_counter()
    raw = run.engine.infer(tensor[None])
    t1 = time.perf_counter()
    run.dets.append(_rows(raw, run, run.conf, iou, lb))
    run.infer_s.append(t1 - t0)
    run.post_s.append(time.perf_counter() - t1)
    if run.low_conf is not None:
        run.dets_low.append(_rows(raw, run, run.low_conf, iou, lb))


def _per_source(frames: Sequence[SourceFrame], ref: Sequence[NDArray[np.float32]],
                views: dict[str, list[NDArray[np.float32]]], names: Sequence[str], min_objects: int
                ) -> dict[str, dict[str, DetectionMetrics]]:
    """Metrics per source file (the part of a frame name before '#'), when there is more than one source."""
    groups: dict[str, list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(Path(f.name.split("#", 1)[0]).name, []).append(i)
    if len(groups) < 2:
        return {}
    return {k: {kind: evaluate([ref[i] for i in idx], [cand[i] for i in idx], names, min_objects=min_objects)
                for kind, cand in views.items()}
            for k, idx in groups.items()}


def _figures(path: Path, run: _Run, prep_s: Sequence[float], threads: int) -> ModelFigures:
    infer = np.asarray(run.infer_s)
    per_frame = float(np.mean(prep_s)) + float(infer.mean()) + float(np.mean(run.post_s))
    return ModelFigures(
        path=str(path), sha256=hashlib.sha256(path.read_bytes()).hexdigest(), bytes=path.stat().st_size,
        threads=threads, infer_ms_mean=round(float(infer.mean()) * 1000, 3),
        infer_ms_median=round(float(np.median(infer)) * 1000, 3), infer_fps=round(1.0 / float(infer.mean()), 2),
        pipeline_fps=round(1.0 / per_frame, 2), boxes=int(sum(len(d) for d in run.dets)),
    )


def write_plot(report: FidelityReport, path: Path | str) -> Path | None:
    """A PNG: per-class AP50 / AP50-95 / recall (classes by reference object count) and speed/size bars.
    Returns None (and logs why) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("fidelity: matplotlib is not installed (pip install matplotlib); no plot written")
        return None
    pub, rk = report.published, report.ranked
    ranked = {k.class_id: k for k in rk.classes} if rk is not None else {}
    classes = list(pub.classes)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(classes))
    bars = [("published AP50", [k.ap50 for k in classes]), ("published recall50", [k.recall50 for k in classes])]
    if rk is not None:
        bars += [("ranked AP50", [ranked[k.class_id].ap50 for k in classes]),
                 ("ranked AP50-95", [ranked[k.class_id].ap50_95 for k in classes])]
    width = 0.8 / len(bars)
    for i, (label, values) in enumerate(bars):
        ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width=width, label=label)
    ax.axhline(0.97, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xticks(x, [f"{k.name}\n({k.ref_objects})" for k in classes], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    head = f"published mAP50 {pub.map50_weighted:.3f} / 50-95 {pub.map50_95_weighted:.3f}"
    if rk is not None:
        head += f"; ranked {rk.map50_weighted:.3f} / {rk.map50_95_weighted:.3f}"
    ax.set_title(f"{Path(report.candidate.path).name} vs {Path(report.reference.path).name}, {report.frames} "
                 f"frames, object-weighted: {head}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    names = ["reference", "candidate"]
    fps = [report.reference.infer_fps, report.candidate.infer_fps]
    ax2.bar(names, fps, color=["tab:gray", "tab:green"])
    for i, (f, b) in enumerate(zip(fps, (report.reference.bytes, report.candidate.bytes), strict=True)):
        ax2.text(i, f, f"{f:.1f} fps\n{b / 1e6:.1f} MB", ha="center", va="bottom", fontsize=8)
    ax2.set_title(f"CPU model frames/s, {report.reference.threads} threads ({report.speedup:.2f}x)", fontsize=9)
    ax2.set_ylim(0, max(fps) * 1.3 if max(fps) > 0 else 1)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
