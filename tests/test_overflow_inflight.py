"""A state lent while the home has a FULL/REGIONS frame of the camera in flight: its reference already holds that
frame's pixels, its cached boxes not yet that frame's detections. The loan carries the in-flight area and the guest
infers it on its first frame, so it publishes what the home publishes for the same frame once its in-flight frame
resolved (instead of the old boxes without the objects that appeared). Real model, vtest frames, CPU path."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.backend import EngineChoice, build_engine
from daemon.config.model import ModelConfig
from daemon.decode.letterbox import letterbox_params
from daemon.delta.cache import box_iou
from daemon.delta.policy import Decision
from daemon.delta.signature import luma_signature
from daemon.delta.tracker import to_source
from daemon.features.state import from_bytes, to_bytes
from daemon.guest import BorrowedState, GuestProcessor, borrow
from daemon.types import FrameResult
from tests.runtime_helpers import vtest_jpegs
from tests.test_overflow_guest import WARM, _config, _frame, _run_home

LATER = 40  # the in-flight frame A: this many frames after the lent history (people moved, some walked in)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Iterator[EngineChoice]:
    choice = build_engine(ModelConfig(path=str(model_path), threads=1), 4)
    yield choice
    choice.engine.close()


def _missing(want: FrameResult, got: FrameResult) -> list[str]:
    """The home's sure boxes that the guest's result has no match for (class, IoU >= 0.5)."""
    return [f"{d.class_name} {d.score:.2f} at {d.x1:.0f},{d.y1:.0f}" for d in want.detections if d.score >= 0.5
            and not any(g.class_id == d.class_id and box_iou(g, d) >= 0.5 for g in got.detections)]


@pytest.mark.parametrize("keyframe", [False, True])
def test_guest_infers_what_was_in_flight_at_the_home(tmp_path: Path, model_path: Path, vtest_path: Path,
                                                     engine: EngineChoice, keyframe: bool) -> None:
    jpegs = vtest_jpegs(vtest_path, WARM + LATER + 2)
    a_jpeg, b_jpeg = jpegs[WARM + LATER], jpegs[WARM + LATER + 1]
    cfg = _config(model_path, tmp_path)
    home, _ = _run_home(cfg, engine, jpegs[:WARM], tmp_path)
    try:
        settled = home.export_camera("cam")
        if keyframe:
            home.delta.request_keyframe("cam")
        img = cv2.imdecode(np.frombuffer(a_jpeg, np.uint8), cv2.IMREAD_COLOR)
        size = engine.engine.model.input_hw[0]
        lb = letterbox_params(img.shape[1], img.shape[0], size)
        a = home.delta.plan("cam", luma_signature(img, lb, size), lb, time.monotonic())  # A in flight, unresolved
        loan = borrow(home, "cam")
    finally:
        home.stop(10.0)
    assert a.decision is (Decision.FULL if keyframe else Decision.REGIONS), a
    state = from_bytes(loan.data, time.monotonic())
    assert state.in_flight is not None and state.in_flight.full is keyframe
    assert state.in_flight.regions == (() if keyframe else a.regions)
    stripped = BorrowedState("cam", to_bytes(dataclasses.replace(state, in_flight=None)))  # the loan before the fix
    guest = GuestProcessor(cfg, engine)
    guest.start()
    try:
        got = guest.process([_frame("cam", 200, b_jpeg)], cfg.cameras, [loan])
        old = guest.process([_frame("cam", 200, b_jpeg)], cfg.cameras, [stripped])
    finally:
        guest.stop()
    # the home: the settled state, then A and B through its own pipeline (B merges with A's detections)
    _, own = _run_home(cfg, engine, [a_jpeg, b_jpeg], tmp_path, settled)
    assert len(own) == 2 and (keyframe or own[0].decision == a.decision.value)
    want, g = own[1], got.results[0]
    assert got.warm == ("cam",) and got.keyframes == 0
    if keyframe:
        assert g.decision == "full"
    else:  # every region of A was inferred on the guest's frame
        assert g.decision in ("regions", "full")
        if g.decision == "regions":
            src = [to_source(r, lb) for r in a.regions]
            assert all(any(o[0] <= r.x1 + 1 and o[1] <= r.y1 + 1 and r.x2 - 1 <= o[2] and r.y2 - 1 <= o[3]
                           for o in g.regions) for r in src), (src, g.regions)
    assert _missing(want, g) == []
    if keyframe:  # without the in-flight area the guest planned its frame warm against A's reference
        assert old.results[0].decision != "full"


def test_bytes_loans_count_as_host_route() -> None:
    from cluster.metrics import MemorySink, WorkerMetrics
    from daemon.delta.policy import CameraDeltaState
    from daemon.features.state import CameraState
    from daemon.guest import borrow_host_arrays, route_of

    state = CameraState("c", np.zeros((80, 80), np.uint8), (), (), CameraDeltaState(True, 0, 1.0, 0), 1.0, 1.0, 2.0)
    assert route_of(borrow_host_arrays(state)) == "host" and route_of(BorrowedState("c", to_bytes(state))) == "host"
    sink = MemorySink()
    m = WorkerMetrics("w", sink)
    m.loan("home", "host", 2)
    m.fallback("guest", "peer_access")
    loans = ("deltayolo_overflow_loans_total", (("route", "host"), ("side", "home"), ("worker", "w")))
    assert sink.counters[loans] == 2
    assert sink.counters[("deltayolo_overflow_fallbacks_total",
                          (("reason", "peer_access"), ("side", "guest"), ("worker", "w")))] == 1
