"""`deltayolo fidelity --delta`: delta caching against full inference on every frame of a video.

Every setting is run through the live pipeline (same batching, packing and merging as in production); the
every-frame detections of the same run are the ground truth. Reports object-weighted / per-class / class-mean
mAP, per-class recall, frames to appear and to disappear, and the work saved as pixels and as inference time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.backend import build_engine
from daemon.cameras import resolve_builtin
from daemon.config.model import DeltaConfig, ModelConfig
from daemon.delta.evaluate import RunRecord, replay_once, track_lags
from daemon.fidelity.metrics import DetectionMetrics, evaluate
from daemon.sources.replay import load_jpeg_frames
from daemon.types import Detection

SWEEP = ({"tile": 32, "margin_tiles": 1}, {"tile": 32, "margin_tiles": 2}, {"tile": 16, "margin_tiles": 3})


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--video", default="builtin:vtest", help="video (or folder of JPEGs) from a fixed camera")
    p.add_argument("--model", default="builtin:yolov8n")
    p.add_argument("--frames", type=int, default=0, help="use the first N frames (0: all)")
    p.add_argument("--json", type=Path, default=Path("delta-fidelity.json"))
    p.add_argument("--plot", type=Path, default=Path("delta-fidelity.png"))


@dataclass(frozen=True, slots=True)
class Row:
    setting: str
    metrics: DetectionMetrics
    pixels_saved: float
    time_saved: float
    decisions: dict[str, int]
    appear_p90: float
    disappear_p90: float


def _arrays(rec: RunRecord, seqs: list[int]) -> list[NDArray[np.float64]]:
    def arr(ds: tuple[Detection, ...]) -> NDArray[np.float64]:
        return np.array([[d.x1, d.y1, d.x2, d.y2, d.score, d.class_id] for d in ds], np.float64).reshape(-1, 6)

    return [arr(rec.detections.get(s, ())) for s in seqs]


def run(args: argparse.Namespace) -> int:
    frames = load_jpeg_frames(resolve_builtin(args.video), 90, limit=args.frames or None)
    choice = build_engine(ModelConfig(path=args.model), 4)
    names = choice.engine.model.class_names
    full = replay_once(choice, frames, DeltaConfig(enabled=False))
    seqs = sorted(full.detections)
    ref = _arrays(full, seqs)
    rows: list[Row] = []
    for setting in SWEEP:
        cand = replay_once(choice, frames, DeltaConfig(enabled=True, keyframe_s=3600, **setting))  # type: ignore[arg-type]
        m = evaluate(ref, _arrays(cand, seqs), names)
        lags = track_lags(full.detections, cand.detections)
        decisions: dict[str, int] = {}
        for d in cand.decisions.values():
            decisions[d] = decisions.get(d, 0) + 1
        rows.append(Row(
            ", ".join(f"{k}={v}" for k, v in setting.items()), m,
            1.0 - float(np.mean(list(cand.inferred.values()))), 1.0 - cand.infer_s / max(full.infer_s, 1e-9),
            decisions, float(np.percentile(lags.appear_frames, 90)) if lags.appear_frames else 0.0,
            float(np.percentile(lags.disappear_frames, 90)) if lags.disappear_frames else 0.0,
        ))
    choice.engine.close()
    _print(rows, len(seqs))
    args.json.write_text(json.dumps([{
        "setting": r.setting, "pixels_saved": r.pixels_saved, "time_saved": r.time_saved, "decisions": r.decisions,
        "appear_frames_p90": r.appear_p90, "disappear_frames_p90": r.disappear_p90, "metrics": r.metrics.to_dict(),
    } for r in rows], indent=1))
    _plot(rows, args.plot)
    print(f"wrote {args.json} and {args.plot}")
    return 0


def _print(rows: list[Row], n: int) -> None:
    print(f"\ndelta fidelity: {n} frames, every-frame FP32 detections as ground truth")
    print(f"{'setting':<28} {'px saved':>8} {'time saved':>10} {'mAP50 ow':>8} {'mAP50-95':>8} {'mAP50 mean':>10} "
          f"{'appear p90':>10} {'gone p90':>8}  major classes AP50")
    for r in rows:
        m = r.metrics
        major = " ".join(f"{c.name}={c.ap50:.3f}" for c in m.major())
        print(f"{r.setting:<28} {r.pixels_saved:>8.1%} {r.time_saved:>10.1%} {m.map50_weighted:>8.3f} "
              f"{m.map50_95_weighted:>8.3f} {m.map50_mean:>10.3f} {r.appear_p90:>10.0f} {r.disappear_p90:>8.0f}  "
              f"{major}")


def _plot(rows: list[Row], path: Path) -> None:
    """A small scatter (work saved vs object-weighted mAP50), drawn with OpenCV: no plotting dependency."""
    w, h, m = 640, 420, 60
    img = np.full((h, w, 3), 255, np.uint8)
    cv2.rectangle(img, (m, 20), (w - 20, h - m), (0, 0, 0), 1)

    def xy(saved: float, ap: float) -> tuple[int, int]:
        return int(m + saved * (w - m - 20)), int(h - m - (ap - 0.9) / 0.1 * (h - m - 20))

    for i in range(0, 11, 2):
        cv2.putText(img, f"{i * 10}%", (m + i * (w - m - 20) // 10 - 12, h - m + 18), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1)
    for ap in (0.9, 0.95, 1.0):
        cv2.putText(img, f"{ap:.2f}", (8, xy(0, ap)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.line(img, xy(0, 0.97), xy(1, 0.97), (0, 160, 0), 1)
    cv2.line(img, xy(0.6, 0.9), xy(0.6, 1.0), (0, 160, 0), 1)
    for r in rows:
        p = xy(r.pixels_saved, min(max(r.metrics.map50_weighted, 0.9), 1.0))
        cv2.circle(img, p, 5, (200, 0, 0), -1)
        cv2.putText(img, r.setting, (p[0] + 6, p[1] - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (60, 60, 60), 1)
    cv2.putText(img, "pixels saved (x) vs object-weighted mAP50 (y); green: targets", (m, h - 15),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
    cv2.imwrite(str(path), img)
