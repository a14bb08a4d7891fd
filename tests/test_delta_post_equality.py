"""The post stage's batch-wide box mapping (daemon.pipeline.post) publishes, bit for bit, what the per-frame,
per-crop code before it published: boxes (cached/fresh marks and ages included) and frame ages of 16 cameras
replaying vtest through plan, canvas packing, decoded rows and resolve, in five settings
(daemon.delta.planbench.replay_post; tests/data/delta_post_expected.json was written by the per-frame code of
daemon/pipeline/runner.py at 0fe9716)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from daemon.delta.planbench import SCENARIOS, ReplayInputs, digest, inputs_digest, load_inputs, replay_post
from daemon.delta.policy import Decision, Rect, Verdict
from daemon.pipeline.post import BatchDetections, source_regions
from daemon.pipeline.prepare import Placement, Prepared
from daemon.pipeline.settings import CameraSettings
from daemon.types import Frame, Letterbox

DATA = Path(__file__).parent / "data"
LB = Letterbox(src_w=768, src_h=576, scale=640 / 768, pad_x=0.0, pad_y=80.0)


@pytest.fixture(scope="module")
def inputs(vtest_path: Path) -> ReplayInputs:
    return load_inputs(vtest_path, DATA / "delta_plan_inputs.json")


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_post_replay_reproduces_the_recorded_outputs(inputs: ReplayInputs, name: str) -> None:
    recorded = json.loads((DATA / "delta_post_expected.json").read_text())
    if inputs_digest(inputs) != recorded["inputs_sha256"]:
        pytest.skip("vtest signatures differ from the recorded ones on this machine (OpenCV decode/resize)")
    expected = recorded["scenarios"][name]
    sc = SCENARIOS[name]
    trace: list[str] = []
    params = replace(sc.params, label_iou=0.0, keep_cut=False)  # the resolve rules the recording predates
    t = replay_post(inputs, params, sc.batches, BatchDetections, capacity=sc.capacity, hold=sc.hold, trace=trace)
    assert t.decisions == expected["decisions"]
    assert digest(trace) == expected["sha256"]


def _settings(conf: float = 0.25, max_det: int = 100, classes: frozenset[int] | None = None) -> CameraSettings:
    return CameraSettings("a", conf, 0.7, max_det, classes, None, ())


def _item(verdict: Verdict, slot: int = -1, placements: tuple[Placement, ...] = (),
          offset: tuple[int, int] = (0, 0)) -> Prepared:
    return Prepared(Frame("a", 1, 0.0, 0.0, jpeg=b"-"), verdict, slot, placements, LB, offset, 768, 576, 0, 0.0,
                    1.0, None)


def _rows(*boxes: tuple[float, ...]) -> np.ndarray:
    return np.asarray(boxes, np.float32).reshape(-1, 6)


def test_a_full_row_maps_to_source_pixels_with_the_camera_filters() -> None:
    row = _rows((64, 144, 128, 224, 0.9, 0), (0, 70, 700, 200, 0.6, 2), (10, 90, 20, 100, 0.3, 0),
                (10, 90, 20, 100, 0.2, 0))
    post = BatchDetections([_item(Verdict(Decision.FULL, "delta off"), slot=0)], [row], lambda c: _settings(),
                           ["person", "bicycle", "car"], None)
    dets, age = post(0)
    assert age == 0.0
    assert [(d.class_name, round(d.score, 2)) for d in dets] == [("person", 0.9), ("car", 0.6), ("person", 0.3)]
    assert (dets[0].x1, dets[0].y1, dets[0].x2, dets[0].y2) == pytest.approx((76.8, 76.8, 153.6, 172.8))
    assert (dets[1].x1, dets[1].x2) == (0.0, 768.0)  # clipped to the source image
    persons = BatchDetections([_item(Verdict(Decision.FULL, "delta off"), slot=0)], [row],
                              lambda c: _settings(max_det=1, classes=frozenset({2})), ["person", "bicycle", "car"],
                              None)
    assert [d.class_name for d in persons(0)[0]] == ["car"]


def test_region_crops_keep_centred_uncut_boxes_moved_back_to_the_frame() -> None:
    region = Rect(320, 160, 416, 320)  # inside the image on every side: every edge can cut
    verdict = Verdict(Decision.REGIONS, "test", (region,))
    canvas = _rows((10, 20, 50, 100, 0.8, 0),  # inside the crop at (0, 0): kept
                   (0, 20, 40, 100, 0.7, 0),  # touches the crop's left edge: cut, dropped
                   (60, 100, 140, 150, 0.6, 0),  # centre beyond the crop's right edge: dropped
                   (100, 20, 150, 100, 0.9, 0))  # another crop's box on the same canvas
    item = _item(verdict, placements=(Placement(0, 0, 0, region),), offset=(5, 7))
    dets, _ = BatchDetections([item], [canvas], lambda c: _settings(), ["person"], None)(0)
    assert len(dets) == 1
    d = dets[0]
    assert (d.x1, d.y1, d.x2, d.y2) == pytest.approx(((330 - 0) / LB.scale + 5, (180 - 80) / LB.scale + 7,
                                                      (370 - 0) / LB.scale + 5, (260 - 80) / LB.scale + 7))
    assert source_regions(item) == ((320 / LB.scale + 5, 80 / LB.scale + 7, 416 / LB.scale + 5,
                                      240 / LB.scale + 7),)


def test_frames_without_settings_or_rows_publish_nothing() -> None:
    item = _item(Verdict(Decision.FULL, "delta off"), slot=0)
    assert BatchDetections([item], [_rows((1, 90, 9, 99, 0.9, 0))], lambda c: None, ["person"], None)(0) == ((), 0.0)
    assert BatchDetections([item], [], lambda c: _settings(), ["person"], None)(0) == ((), 0.0)
    skip = _item(Verdict(Decision.SKIP, "no change"))
    assert BatchDetections([skip], [_rows()], lambda c: _settings(), ["person"], None)(0) == ((), 0.0)


def test_a_batch_whose_last_rows_found_nothing_publishes_the_others() -> None:
    """Found on 4x H200 (cluster bench, 64 cameras, delta on): a batch whose last frame's row held no box crashed
    the post stage (an index one past the batch's boxes), which stopped the worker's pipeline."""
    first = _item(Verdict(Decision.FULL, "keyframe"), slot=0)
    empty = _item(Verdict(Decision.FULL, "keyframe"), slot=1)
    region = Rect(320, 160, 416, 320)
    crop = _item(Verdict(Decision.REGIONS, "test", (region,)), placements=(Placement(2, 0, 0, region),))
    rows = [_rows((64, 144, 128, 224, 0.9, 0)), _rows(), _rows()]
    post = BatchDetections([first, empty, crop], rows, lambda c: _settings(), ["person"], None)
    assert [d.score for d in post(0)[0]] == pytest.approx([0.9])
    assert post(1) == ((), 0.0) and post(2) == ((), 0.0)
