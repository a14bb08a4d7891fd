"""On a machine with 2 GPUs (skipped elsewhere): a camera's state exported on GPU 0 and imported on GPU 1 (as one
device buffer copied peer to peer) continues exactly like the camera that stayed on GPU 0; the move is timed
over the peer route and through host memory. ``DELTAYOLO_MOVE_JSON=FILE`` writes the report there."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from cluster.movecheck import features_for, run_move_check
from daemon.sources.replay import load_jpeg_frames


def _gpus() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@pytest.mark.gpu
@pytest.mark.skipif(_gpus() < 2, reason="needs 2 GPUs")
def test_camera_moves_from_gpu0_to_gpu1_without_a_cold_start(model_path: Path, vtest_path: Path) -> None:
    jpegs = load_jpeg_frames(vtest_path, 90, 24)
    feats = features_for(model_path, jpegs[11])
    report = run_move_check(model_path, jpegs, split=12, devices=(0, 1), threads=4, features=feats,
                            device_route=True)
    out = os.environ.get("DELTAYOLO_MOVE_JSON")
    if out:
        Path(out).write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    print(json.dumps({**asdict(report), "ok": report.ok}))
    assert report.backend_a.startswith("gpu:") and report.backend_b.startswith("gpu:")
    assert report.moved_by == "device buffer, peer copy" and report.route is not None
    assert report.route.peer_ms is not None and report.route.host_ms is not None
    assert report.features_equal is True
    assert report.decisions_cold[0] == "full" and report.decisions_moved[0] != "full"
    assert report.same_decisions, (report.decisions_stay, report.decisions_moved)
    assert report.same_detections, (report.max_box_diff_px, report.max_score_diff)
