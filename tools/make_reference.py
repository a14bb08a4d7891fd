"""Record reference detections with Ultralytics' own predictor, independently of deltayolo's code.

Run it once, in a scratch venv outside the repo (torch must be the CPU build that lies on this disk):

    python3 -m venv /tmp/ulvenv
    /tmp/ulvenv/bin/pip install /opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl
    /tmp/ulvenv/bin/pip install --no-deps torchvision==0.28.0   # metadata only, see below
    /tmp/ulvenv/bin/pip install ultralytics==8.4.190 onnxruntime  # then re-check `pip list`: no CUDA torch
    YOLO_OFFLINE=1 ORT_DISABLE_TELEMETRY=1 /tmp/ulvenv/bin/python tools/make_reference.py

It writes tests/data/reference_detections.json: per image, boxes (xyxy, source pixels), class id, name and
score from ``YOLO(model, task="detect").predict(image, conf=0.25, iou=0.7, imgsz=640)``.

The only torchvision on this machine's indexes is a CUDA build whose ``_C`` cannot load beside the CPU torch, so
``import torchvision`` fails (Ultralytics' ONNX warm-up imports it). When that happens we register a stand-in
``torchvision`` module whose ``ops.nms`` is Ultralytics' own ``TorchNMS.nms`` (documented by Ultralytics as
matching torchvision exactly); everything else (LetterBox, AutoBackend's onnxruntime session,
``non_max_suppression``, ``scale_boxes``) is Ultralytics' unmodified code. The JSON records which NMS ran.

This file does not import deltayolo: the reference must not share code with what it checks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

REPO = Path(__file__).resolve().parents[1]
CONF = 0.25
IOU = 0.7
IMGSZ = 640


def _cache() -> Path:
    env = os.environ.get("DELTAYOLO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltayolo"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _nms_kernel() -> str:
    """Import torchvision; when its C ops cannot load, stand in Ultralytics' TorchNMS (see module doc)."""
    try:
        tv = importlib.import_module("torchvision")
        tv.ops.nms  # noqa: B018 - touch the op so a missing kernel fails here
        return f"torchvision {tv.__version__}"
    except Exception as exc:  # any failure means the real kernel is unusable
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        print(f"torchvision unusable ({type(exc).__name__}: {exc}); using Ultralytics TorchNMS", file=sys.stderr)
    nms_mod = importlib.import_module("ultralytics.utils.nms")
    stub = types.ModuleType("torchvision")
    ops = types.ModuleType("torchvision.ops")
    ops.nms = nms_mod.TorchNMS.nms  # type: ignore[attr-defined]
    stub.ops = ops  # type: ignore[attr-defined]
    sys.modules["torchvision"] = stub
    sys.modules["torchvision.ops"] = ops
    return "ultralytics TorchNMS.nms (torchvision stand-in)"


def _record(model: Any, image: Path) -> dict[str, Any]:
    result = model.predict(str(image), conf=CONF, iou=IOU, imgsz=IMGSZ, verbose=False)[0]
    h, w = result.orig_shape
    boxes = result.boxes
    dets = [
        {"cls": int(c), "name": result.names[int(c)], "score": round(float(s), 6),
         "box": [round(float(v), 4) for v in xyxy]}
        for xyxy, s, c in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True)
    ]
    return {"file": image.name, "sha256": _sha256(image), "width": int(w), "height": int(h), "detections": dets}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=_cache() / "models" / "yolov8n.onnx")
    parser.add_argument("--images", type=Path, nargs="+",
                        default=[_cache() / "data" / "bus.jpg", _cache() / "data" / "zidane.jpg"])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "reference_detections.json")
    args = parser.parse_args(argv)

    ultralytics = importlib.import_module("ultralytics")
    kernel = _nms_kernel()
    torch = importlib.import_module("torch")
    ort = importlib.import_module("onnxruntime")
    model = ultralytics.YOLO(str(args.model), task="detect")
    images = {p.stem: _record(model, p) for p in args.images}
    doc = {
        "generator": "tools/make_reference.py (Ultralytics predictor on the ONNX model, CPU)",
        "versions": {"ultralytics": ultralytics.__version__, "torch": torch.__version__,
                     "onnxruntime": ort.__version__},
        "nms": kernel,
        "model": {"file": args.model.name, "sha256": _sha256(args.model)},
        "params": {"conf": CONF, "iou": IOU, "imgsz": IMGSZ, "max_det": 300, "agnostic_nms": False},
        "images": images,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    for name, rec in images.items():
        print(f"{name}: {len(rec['detections'])} detections")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
