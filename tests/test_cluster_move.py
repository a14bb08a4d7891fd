"""Camera state moves (feature-cache issue, part 4; used by the cluster's group moves): a camera whose state is
exported from one Runtime and imported into another gives the same next-frame decisions and detections as a
camera that stayed; unusable state leaves the camera cold (a keyframe) and never half-installed."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from cluster.cache_transfer import STATE_FORMAT, CacheBlob, RuntimeStateTransfer
from cluster.movecheck import run_move_check
from daemon.delta.policy import Decision, DeltaParams, Verdict
from daemon.delta.tracker import DeltaTracker
from daemon.features import state as st
from daemon.features.state import StateError
from daemon.sources.replay import load_jpeg_frames
from daemon.types import Detection, Letterbox


@pytest.fixture(scope="module")
def jpegs(vtest_path: Path) -> list[bytes]:
    return load_jpeg_frames(vtest_path, 90, 16)


def test_moved_camera_continues_like_one_that_stayed(model_path: Path, jpegs: list[bytes]) -> None:
    rng = np.random.default_rng(0)
    feats = [rng.standard_normal(s).astype(np.float16) for s in ((8, 16, 16), (16, 8, 8), (32, 4, 4))]
    report = run_move_check(model_path, jpegs, split=8, threads=1, features=feats)
    assert report.backend_a.startswith("cpu:") and report.backend_b.startswith("cpu:")
    assert report.same_decisions, (report.decisions_stay, report.decisions_moved)
    assert report.same_detections and report.max_box_diff_px == 0.0 and report.max_score_diff == 0.0
    assert report.features_equal is True and report.ok
    assert sum(report.boxes_stay) > 0  # people were detected on these frames
    # the moved camera went on from its reference; the cold one had to start with a full frame
    assert report.decisions_cold[0] == "full" and report.decisions_moved[0] != "full"
    assert 1000 < report.state_bytes < 200_000 and report.feature_bytes == sum(int(f.nbytes) for f in feats)


def _lb() -> Letterbox:
    return Letterbox(scale=1.0, pad_x=0.0, pad_y=0.0, src_w=640, src_h=640)


def _tracked(camera: str = "c") -> DeltaTracker:
    tr = DeltaTracker()
    tr.configure(camera, DeltaParams())
    sig = np.full((160, 160), 100, np.uint8)
    v = tr.plan(camera, sig, _lb(), 10.0)
    tr.resolve(camera, v, [Detection(0, "person", 0.9, 10, 20, 30, 40)], _lb(), 10.0)
    return tr


def test_export_waits_for_a_frame_in_flight_then_forces_a_keyframe() -> None:
    tr = _tracked()
    state = tr.export_state("c", 11.0, wait_s=0.0)
    assert state.policy.has_reference and state.detections[0].age_s == pytest.approx(1.0)
    v = tr.plan("c", np.full((160, 160), 100, np.uint8), _lb(), 11.0)  # planned, not resolved
    t = time.monotonic()
    stale = tr.export_state("c", 11.5, wait_s=0.2)
    assert time.monotonic() - t >= 0.19 and not stale.policy.has_reference  # importer starts with FULL
    tr.resolve("c", v, [], _lb(), 11.5)
    assert tr.export_state("c", 12.0, wait_s=5.0).policy.has_reference  # settled: no wait


def test_import_round_trip_and_refusals() -> None:
    src = _tracked()
    data = st.to_bytes(src.export_state("c", 11.0))
    dst = DeltaTracker()
    with pytest.raises(StateError, match="delta caching is off"):
        dst.import_state("c", st.from_bytes(data, 50.0), 50.0)
    dst.configure("c", DeltaParams())
    with pytest.raises(StateError, match="offered to camera"):
        dst.import_state("other", st.from_bytes(data, 50.0), 50.0)
    dst.import_state("c", st.from_bytes(data, 50.0), 50.0)
    v = dst.plan("c", np.full((160, 160), 100, np.uint8), _lb(), 50.5)
    assert v.decision == "skip"  # warm: the imported reference matches, nothing changed
    boxes, _age = dst.resolve("c", v, [], _lb(), 50.5)
    assert [(d.x1, d.cached) for d in boxes] == [(10, True)] and boxes[0].age_s == pytest.approx(1.5)
    with pytest.raises(StateError, match="too large"):
        st.from_bytes(data[:12] + (2**40).to_bytes(8, "little") + data[20:], 0.0)
    bad = st.CameraState("c", np.zeros((2, 2, 2), np.uint8), (), (), src.export_state("c", 1.0).policy, 1.0, 0.0, 0.0)
    with pytest.raises(StateError, match="signature of shape"):
        dst.import_state("c", bad, 1.0)


class _FakeRuntime:
    """What RuntimeStateTransfer uses of a Runtime."""

    def __init__(self) -> None:
        self.delta = DeltaTracker()
        self.delta.configure("c", DeltaParams())
        self.imported: list[bytes] = []

    def export_camera(self, camera: str, wait_s: float = 1.0) -> bytes:
        return st.to_bytes(self.delta.export_state(camera, 1.0, wait_s))

    def import_camera(self, camera: str, data: bytes) -> None:
        self.delta.import_state(camera, st.from_bytes(data, 2.0), 2.0)
        self.imported.append(data)


def test_transfer_is_warm_on_good_state_and_cold_with_a_keyframe_otherwise() -> None:
    rt = _FakeRuntime()
    timings: list[object] = []
    tr = RuntimeStateTransfer(rt, "worker-0", on_timing=timings.append)  # type: ignore[arg-type]
    blob = tr.export_camera("c", "peer")
    assert blob is not None and blob.format == STATE_FORMAT and blob.source_worker == "worker-0"
    assert tr.export_camera("unknown", "host") is None  # delta off for it: nothing to move
    assert tr.import_camera(blob) and rt.imported == [blob.data]
    assert not tr.import_camera(CacheBlob("c", STATE_FORMAT, b"NOPE" + blob.data[4:], 0))
    assert not tr.import_camera(CacheBlob("c", "cuda-ipc-v1", blob.data, 0))
    v = rt.delta.plan("c", np.full((160, 160), 100, np.uint8), _lb(), 3.0)
    assert v.decision == "full"  # the failed import asked for a keyframe
    assert [t.phase for t in timings] == ["export", "import", "import"]  # type: ignore[attr-defined]


def test_verdict_identity_is_what_settles_a_frame() -> None:
    tr = _tracked()
    tr.plan("c", np.full((160, 160), 100, np.uint8), _lb(), 11.0)
    tr.resolve("c", Verdict(Decision.SKIP, "another frame's verdict"), [], _lb(), 11.0)
    assert not tr.export_state("c", 11.0, wait_s=0.0).policy.has_reference
