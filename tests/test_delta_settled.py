"""Settled snapshots for checkpoints: a camera that always has a frame in flight (high frame rates) still gets
checkpoints, taken from the tracker's snapshot of its last settled state (no wait, built outside the lock), and a
fail-over import from one goes on exactly like the camera that stayed. Real vtest frames' signatures, the real
tracker; each frame's fresh boxes are fixed per frame (the tracker is what is under test)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from cluster.checkpoint import Checkpointer, settled_checkpoint
from daemon.decode.letterbox import letterbox_params
from daemon.delta.policy import DeltaParams, Verdict
from daemon.delta.signature import luma_signature
from daemon.delta.tracker import DeltaTracker
from daemon.features.state import from_bytes, to_bytes
from daemon.types import Detection, Letterbox
from tests.runtime_helpers import vtest_jpegs

SIZE = 640
PARAMS = DeltaParams(keyframe_frames=1000, keyframe_s=3600, drift_tiles=1_000_000, recheck_frames=0,
                     recheck_score=0.0, ghost_frames=0)


@pytest.fixture(scope="module")
def frames(vtest_path: Path) -> list[tuple[np.ndarray, Letterbox]]:
    out = []
    for j in vtest_jpegs(vtest_path, 40):
        img = cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)
        lb = letterbox_params(img.shape[1], img.shape[0], SIZE)
        out.append((luma_signature(img, lb, SIZE), lb))
    return out


def _fresh(k: int) -> list[Detection]:
    """Frame k's inferred boxes (source pixels): people walking right, one parked car."""
    return [Detection(0, "person", 0.9, 100 + 3 * k, 200, 140 + 3 * k, 300),
            Detection(0, "person", 0.8, 500 - 2 * k, 150, 530 - 2 * k, 240),
            Detection(2, "car", 0.7, 600, 400, 700, 470)]


def _tracker() -> DeltaTracker:
    tr = DeltaTracker()
    tr.configure("c", PARAMS)
    return tr


def _feed(tr: DeltaTracker, frames: list[tuple[np.ndarray, Letterbox]], ks: range, depth: int,
          drain: bool = False) -> None:
    """Plan frames ``ks`` keeping ``depth`` of them in flight (resolved in order, as the pipeline does); with
    ``drain`` the last ones are resolved too."""
    pending: list[tuple[int, Verdict]] = []
    for k in ks:
        sig, lb = frames[k]
        pending.append((k, tr.plan("c", sig, lb, float(k))))
        while len(pending) > depth or (drain and k == ks[-1] and pending):
            j, w = pending.pop(0)
            tr.resolve("c", w, _fresh(j), frames[j][1], j + 0.5)  # resolved at a time of its own


def _step(tr: DeltaTracker, frames: list[tuple[np.ndarray, Letterbox]], k: int) -> tuple[str, tuple[object, ...]]:
    sig, lb = frames[k]
    v = tr.plan("c", sig, lb, float(k))
    boxes, _ = tr.resolve("c", v, _fresh(k), lb, float(k))
    return str(v.decision), tuple(sorted((d.class_id, d.x1, d.y1, d.x2, d.y2, d.score, d.cached) for d in boxes))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_camera_always_in_flight_is_checkpointed_and_continues_like_one_that_stayed(frames: list, depth: int,
                                                                                      ) -> None:
    busy = _tracker()
    _feed(busy, frames, range(0, 20), depth)  # the last ``depth`` frames still in flight: never settled
    assert busy.export_state("c", 20.0, wait_s=0.0).policy.has_reference is False  # the old way: no checkpoint
    got = busy.settled_state("c", 20.0)
    assert got is not None and got.policy.has_reference and got.in_flight is None

    stayed = _tracker()  # the same frames up to the last one resolved, none in flight
    _feed(stayed, frames, range(0, 20 - depth), depth, drain=True)
    want = stayed.export_state("c", 20.0, wait_s=0.0)
    assert want.policy.has_reference
    assert np.array_equal(got.signature, want.signature)
    assert (got.policy, got.noise_floor, got.last_inferred, got.detections) == \
        (want.policy, want.noise_floor, want.last_inferred, want.detections)

    moved = _tracker()  # fail-over: the checkpoint's bytes imported elsewhere; then both see the next frames
    moved.import_state("c", from_bytes(to_bytes(got), 20.0), 20.0)
    twin = _tracker()
    twin.import_state("c", from_bytes(to_bytes(want), 20.0), 20.0)
    ks = range(20 + 2, 36)  # the frames in flight at the death are lost
    a = [_step(moved, frames, k) for k in ks]
    b = [_step(stayed, frames, k) for k in ks]
    assert a == b == [_step(twin, frames, k) for k in ks]
    assert {d for d, _ in a} - {"full"}, a  # warm: not all keyframes


def test_the_checkpointer_takes_states_of_a_camera_that_is_never_settled(frames: list) -> None:
    tr = _tracker()
    _feed(tr, frames, range(0, 10), depth=2)
    cp = Checkpointer(lambda cam: settled_checkpoint(lambda c: tr.settled_state(c, 10.0), cam, "w"), lambda: ["c"],
                      1.0)
    assert cp.run_once() == 1 and cp.unsettled == 0
    infos = cp.infos()
    assert [i.camera for i in infos] == ["c"] and infos[0].nbytes > 80 * 80
    blob = cp.fetch(["c"], 1 << 20)[0].blob
    assert from_bytes(blob.data, 0.0).policy.has_reference


def test_references_are_replaced_never_edited_so_snapshots_stay_valid(frames: list) -> None:
    tr = _tracker()
    _feed(tr, frames, range(0, 6), depth=0)
    snap = tr.settled_state("c", 6.0)
    assert snap is not None
    before = snap.signature.copy()
    _feed(tr, frames, range(6, 30), depth=1)  # REGIONS frames update the reference: a new array each time
    assert np.array_equal(snap.signature, before)
