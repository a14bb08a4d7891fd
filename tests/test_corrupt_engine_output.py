"""A corrupt engine output in the running daemon: the real YOLOv8n on real vtest frames, whose raw output gets a NaN
corner on each row's strongest anchor (what a failing accelerator or a broken engine file can return). The
daemon leaves those boxes out, keeps serving every frame (delta caching on, so a NaN box would otherwise be
cached and crash the next plan), and counts them in its stats record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from daemon.backend import EngineChoice
from daemon.config.loader import parse_config
from daemon.inference.model import load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from tests.runtime_helpers import iou_matrix, replay_to_end, vtest_jpegs


class _NanCorner(OnnxRuntimeEngine):
    """The real engine; then x1 of each row's highest-scoring anchor set to NaN (layout (B, 4 + classes, anchors))."""

    def infer(self, batch: Any) -> Any:
        out = np.array(super().infer(batch), copy=True)
        for row in out:
            best = int(np.argmax(row[4:].max(axis=0)))
            row[0, best] = np.nan
        return out


def test_nan_boxes_from_the_engine_are_left_out_counted_and_the_cameras_keep_serving(
        tmp_path: Path, model_path: Path, vtest_path: Path) -> None:
    cfg = parse_config(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model_path}}}\ncameras:\n"
        "  - id: a\n    source: {type: replay, path: x.avi, realtime: false, loop: false}\n"
        "batching: {max_batch: 4, max_wait_ms: 5}\ndelta: {enabled: true}\nstats: {interval_s: 100}\n"
    )
    choice = EngineChoice(_NanCorner(load_model(model_path), max_batch=4, threads=2), "cpu:onnxruntime", "test")
    records = replay_to_end(cfg, choice, vtest_jpegs(vtest_path, 12), tmp_path / "d.jsonl")
    dets = [r for r in records if r["kind"] == "detections"]
    assert [r["seq"] for r in dets] == list(range(12))
    assert all(len(r["boxes"]) > 0 for r in dets)  # the other boxes of each frame are still published
    assert all(np.isfinite([b[k] for r in dets for b in r["boxes"] for k in ("x1", "y1", "x2", "y2", "score")]))
    for r in dets:  # NMS still worked around the NaN box: no two person boxes on the same object
        xyxy = np.array([[b["x1"], b["y1"], b["x2"], b["y2"]] for b in r["boxes"] if b["class_id"] == 0]).reshape(-1, 4)
        assert np.triu(iou_matrix(xyxy, xyxy), k=1).max(initial=0.0) <= 0.7 + 1e-3, r["seq"]
    stats = [r for r in records if r["kind"] == "stats"]
    assert stats and stats[-1]["corrupt_boxes"] >= 1
