"""The host side of delta caching reproduces, bit for bit, what the code before its speed-ups decided and output:
decisions, reasons, regions, canvas placements, published boxes (ages included), policy state, noise floor and
reference signatures of 16 cameras replaying vtest with recorded YOLOv8n boxes, in five settings
(daemon.delta.planbench; tests/data/delta_plan_expected.json was written by the original code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from daemon.delta.planbench import SCENARIOS, ReplayInputs, digest, inputs_digest, load_inputs, replay

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def inputs(vtest_path: Path) -> ReplayInputs:
    return load_inputs(vtest_path, DATA / "delta_plan_inputs.json")


@pytest.mark.parametrize(("per_frame", "gpu_layout"), [(False, False), (True, False), (False, True)],
                         ids=["rounds", "per-frame", "gpu-layout"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_replay_reproduces_the_recorded_outputs(inputs: ReplayInputs, name: str, per_frame: bool,
                                                gpu_layout: bool) -> None:
    """Planned a round at a time (DeltaTracker.plan_round, the GPU path) and a frame at a time (plan, the CPU
    path), laid out by fit_regions or by the GPU preparer's host side (lay_out): the same recorded outputs."""
    recorded = json.loads((DATA / "delta_plan_expected.json").read_text())
    if inputs_digest(inputs) != recorded["inputs_sha256"]:  # decode/resize differ here: the outputs cannot match
        pytest.skip("vtest signatures differ from the recorded ones on this machine (OpenCV decode/resize)")
    expected = recorded["scenarios"][name]
    sc = SCENARIOS[name]
    trace: list[str] = []
    t = replay(inputs, sc.params, sc.batches, capacity=sc.capacity, hold=sc.hold, trace=trace, per_frame=per_frame,
               gpu_layout=gpu_layout)
    assert t.decisions == expected["decisions"]
    assert digest(trace) == expected["sha256"]


def test_merge_rects_matches_the_restarting_scan() -> None:
    """merge_rects resumes its scan after a merge; the definition restarts it: same rects, same order."""
    import numpy as np

    from daemon.delta.policy import Rect, merge_rects

    def near(a: Rect, b: Rect, gap: int) -> bool:
        return a.x1 < b.x2 + gap and b.x1 < a.x2 + gap and a.y1 < b.y2 + gap and b.y1 < a.y2 + gap

    def definition(rects: list[Rect], gap: int) -> list[Rect]:
        out = list(rects)
        merged = True
        while merged:
            merged = False
            for i in range(len(out)):
                for j in range(i + 1, len(out)):
                    if near(out[i], out[j], gap):
                        b = out.pop(j)
                        a = out[i]
                        out[i] = Rect(min(a.x1, b.x1), min(a.y1, b.y1), max(a.x2, b.x2), max(a.y2, b.y2))
                        merged = True
                        break
                if merged:
                    break
        return out

    rng = np.random.default_rng(3)
    for trial in range(3000):
        rects = []
        for _ in range(int(rng.integers(0, 14))):
            x, y = int(rng.integers(0, 600)), int(rng.integers(0, 600))
            rects.append(Rect(x, y, x + int(rng.integers(1, 120)), y + int(rng.integers(1, 120))))
        gap = int(rng.choice([0, 8, 16, 40]))
        assert merge_rects(rects, gap) == definition(rects, gap), (trial, rects, gap)


def test_a_new_letterbox_moves_the_cached_boxes_with_it() -> None:
    """The tracker keeps each camera's content rect and its boxes' model-input rects while the letterbox stays;
    when a frame comes with another letterbox, a change must pull in the box where that letterbox puts it."""
    import numpy as np

    from daemon.delta.policy import Decision, DeltaParams
    from daemon.delta.tracker import DeltaTracker, to_input
    from daemon.types import Detection, Letterbox

    lb1 = Letterbox(scale=640 / 768, pad_x=0.0, pad_y=80.0, src_w=768, src_h=576)
    lb2 = Letterbox(scale=640 / 1280, pad_x=0.0, pad_y=80.0, src_w=1280, src_h=960)
    rng = np.random.default_rng(0)
    sig = np.full((80, 80), 114, np.uint8)
    sig[10:70, :] = rng.integers(40, 200, (60, 80), dtype=np.uint8)
    det = Detection(0, "person", 0.9, 600.0, 300.0, 700.0, 500.0)
    tr = DeltaTracker()
    tr.configure("c", DeltaParams())
    v = tr.plan("c", sig, lb1, 0.0)
    assert v.decision is Decision.FULL
    tr.resolve("c", v, [det], lb1, 0.0)
    v = tr.plan("c", sig, lb1, 0.1)
    assert v.decision is Decision.SKIP
    tr.resolve("c", v, [], lb1, 0.1)
    moved = sig.copy()
    moved[32:35, 40:43] = 255 - moved[32:35, 40:43]  # a change at input (320..344, 256..280): on lb2's box
    v = tr.plan("c", moved, lb2, 0.2)
    assert v.decision is Decision.REGIONS
    box = to_input(det, lb2)
    assert any(r.x1 <= box.x1 and box.x2 <= r.x2 and r.y1 <= box.y1 and box.y2 <= r.y2 for r in v.regions)
    far = to_input(det, lb1)  # where lb1 put it: untouched by this change
    assert not any(r.x1 <= far.x1 and far.x2 <= r.x2 and r.y1 <= far.y1 and far.y2 <= r.y2 for r in v.regions)
