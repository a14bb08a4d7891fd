"""Acceptance: our CPU chain reproduces Ultralytics' own predictor on bus.jpg and zidane.jpg.

The reference (tests/data/reference_detections.json) was recorded once, independently of deltayolo's code, with
Ultralytics 8.4.190 running the same yolov8n.onnx (conf 0.25, iou 0.7, imgsz 640) in a scratch venv:

    python3 -m venv /tmp/ulvenv
    /tmp/ulvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/ulvenv/bin/pip install --no-deps torchvision==0.28.0
    /tmp/ulvenv/bin/pip install ultralytics==8.4.190 onnxruntime
    YOLO_OFFLINE=1 ORT_DISABLE_TELEMETRY=1 /tmp/ulvenv/bin/python tools/make_reference.py

(see tools/make_reference.py for why torchvision's NMS kernel is stood in by Ultralytics' TorchNMS).
Boxes must agree within 2 px per coordinate and scores within 0.01, one to one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.inference.model import LoadedModel, load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.inference.yolo import decode_output, to_detections
from daemon.types import Detection, Letterbox

REFERENCE = Path(__file__).parent / "data" / "reference_detections.json"
BOX_TOL_PX = 2.0
SCORE_TOL = 0.01
MAX_PIXELS = 40_000_000


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return doc


@pytest.fixture(scope="module")
def model(model_path: Path, reference: dict[str, Any]) -> LoadedModel:
    loaded = load_model(model_path)
    assert loaded.sha256 == reference["model"]["sha256"], "reference was recorded on another model file"
    return loaded


@pytest.fixture(scope="module")
def engine(model: LoadedModel) -> Iterator[OnnxRuntimeEngine]:
    eng = OnnxRuntimeEngine(model, max_batch=4, threads=2)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def images(bus_path: Path, zidane_path: Path) -> dict[str, NDArray[np.uint8]]:
    return {"bus": decode_jpeg(bus_path.read_bytes(), MAX_PIXELS),
            "zidane": decode_jpeg(zidane_path.read_bytes(), MAX_PIXELS)}


def _detect(
    engine: OnnxRuntimeEngine, imgs: list[NDArray[np.uint8]], params: dict[str, Any]
) -> list[tuple[Detection, ...]]:
    h, w = engine.model.input_hw
    batch = np.empty((len(imgs), 3, h, w), dtype=np.float32)
    boxes: list[Letterbox] = [letterbox_into(img, (h, w), batch[i]) for i, img in enumerate(imgs)]
    raw = engine.infer(batch)
    rows = decode_output(raw, engine.model.layout, params["conf"], params["iou"], max_det=params["max_det"])
    return [to_detections(r, lb, engine.model.class_names) for r, lb in zip(rows, boxes, strict=True)]


@pytest.mark.parametrize("name", ["bus", "zidane"])
def test_matches_ultralytics_reference(
    name: str, engine: OnnxRuntimeEngine, images: dict[str, NDArray[np.uint8]], reference: dict[str, Any]
) -> None:
    ref = reference["images"][name]
    img = images[name]
    assert (img.shape[1], img.shape[0]) == (ref["width"], ref["height"])
    (ours,) = _detect(engine, [img], reference["params"])
    expected = ref["detections"]
    assert len(expected) > 0
    assert len(ours) == len(expected), f"{name}: {len(ours)} boxes vs {len(expected)} in the reference"
    unmatched = list(ours)
    for want in expected:
        match = _closest(unmatched, want)
        unmatched.remove(match)
        got = np.array([match.x1, match.y1, match.x2, match.y2])
        err = float(np.abs(got - np.array(want["box"])).max())
        assert err <= BOX_TOL_PX, f"{name} {want['name']}: box {got.round(2)} vs {want['box']} ({err:.2f} px)"
        assert abs(match.score - want["score"]) <= SCORE_TOL, f"{name}: score {match.score} vs {want['score']}"
        assert match.class_name == want["name"]


def _closest(candidates: list[Detection], want: dict[str, Any]) -> Detection:
    same = [d for d in candidates if d.class_id == want["cls"]]
    assert same, f"no {want['name']} left to match {want}"
    ref = np.array(want["box"])
    return min(same, key=lambda d: float(np.abs(np.array([d.x1, d.y1, d.x2, d.y2]) - ref).max()))


def test_batch_of_four_equals_batch_of_one(
    engine: OnnxRuntimeEngine, images: dict[str, NDArray[np.uint8]], reference: dict[str, Any]
) -> None:
    imgs = [images["bus"], images["zidane"], images["zidane"], images["bus"]]
    h, w = engine.model.input_hw
    batch = np.empty((4, 3, h, w), dtype=np.float32)
    for i, img in enumerate(imgs):
        letterbox_into(img, (h, w), batch[i])
    raw4 = engine.infer(batch)
    raw1 = np.concatenate([engine.infer(batch[i : i + 1]) for i in range(4)])
    assert raw4.shape == (4, 84, 8400)
    assert float(np.abs(raw4 - raw1).max()) <= 1e-4
    dets4 = _detect(engine, imgs, reference["params"])
    dets1 = [_detect(engine, [img], reference["params"])[0] for img in imgs]
    counts = {n: len(reference["images"][n]["detections"]) for n in ("bus", "zidane")}
    assert [len(d) for d in dets4] == [counts["bus"], counts["zidane"], counts["zidane"], counts["bus"]]
    for a, b in zip(dets4, dets1, strict=True):
        for da, db in zip(a, b, strict=True):
            assert da.class_id == db.class_id
            assert abs(da.score - db.score) <= 1e-4
            assert max(abs(da.x1 - db.x1), abs(da.y1 - db.y1), abs(da.x2 - db.x2), abs(da.y2 - db.y2)) <= 1e-2
