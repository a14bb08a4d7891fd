"""Draws detections on a BGR image: fresh boxes solid in their class color, cached boxes dashed in gray.

Used by the live preview; pure drawing on numpy arrays with OpenCV, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.types import Detection

Color = tuple[int, int, int]  # BGR

# Saturated, distinct BGR colors, indexed by class id (person = 0 is red-orange).
PALETTE: tuple[Color, ...] = (
    (56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
    (23, 204, 146), (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0),
    (147, 69, 52), (255, 115, 100), (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203),
    (200, 149, 255), (199, 55, 255),
)
CACHED_COLOR: Color = (160, 160, 160)
REGION_COLOR: Color = (255, 255, 0)  # cyan
DASH_PX = 8


@dataclass(frozen=True, slots=True)
class Rect:
    """An axis-aligned rectangle in source-image pixels (e.g. a changed region the delta policy ran)."""

    x1: float
    y1: float
    x2: float
    y2: float


def class_color(class_id: int) -> Color:
    return PALETTE[class_id % len(PALETTE)]


def annotate(
    image: NDArray[np.uint8],
    detections: Sequence[Detection],
    cached: bool = False,
    regions: Sequence[Rect] = (),
    caption: str | None = None,
    scale: float = 1.0,
) -> NDArray[np.uint8]:
    """A copy of ``image`` (BGR HxWx3) with boxes, labels, regions and a caption drawn on it.

    ``scale`` maps detection/region coordinates (source pixels) onto ``image`` when it was resized.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(
            f"annotate needs a BGR uint8 HxWx3 image, got shape {image.shape} dtype {image.dtype}")
    out = np.ascontiguousarray(image).copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    for r in regions:
        p1, p2 = _clip(r.x1 * scale, r.y1 * scale, r.x2 * scale, r.y2 * scale, w, h)
        cv2.rectangle(out, p1, p2, REGION_COLOR, 1, cv2.LINE_4)
    for d in detections:
        p1, p2 = _clip(d.x1 * scale, d.y1 * scale, d.x2 * scale, d.y2 * scale, w, h)
        if cached or d.cached:
            dashed_rectangle(out, p1, p2, CACHED_COLOR, thick)
            label_color = CACHED_COLOR
        else:
            label_color = class_color(d.class_id)
            cv2.rectangle(out, p1, p2, label_color, thick, cv2.LINE_AA)
        _label(out, p1, f"{d.class_name} {d.score:.2f}", label_color)
    if caption:
        _caption(out, caption)
    return out


def dashed_rectangle(image: NDArray[np.uint8], p1: tuple[int, int], p2: tuple[int, int], color: Color,
                     thickness: int = 1, dash: int = DASH_PX) -> None:
    """Draw a dashed rectangle in place."""
    (x1, y1), (x2, y2) = p1, p2
    for a, b in (((x1, y1), (x2, y1)), ((x2, y1), (x2, y2)), ((x2, y2), (x1, y2)), ((x1, y2), (x1, y1))):
        length = max(abs(b[0] - a[0]), abs(b[1] - a[1]), 1)
        dx, dy = b[0] - a[0], b[1] - a[1]
        for start in range(0, length + 1, 2 * dash):
            end = min(start + dash, length)
            s = (a[0] + dx * start // length, a[1] + dy * start // length)
            e = (a[0] + dx * end // length, a[1] + dy * end // length)
            cv2.line(image, s, e, color, thickness, cv2.LINE_4)


def _clip(
    x1: float, y1: float, x2: float, y2: float, w: int, h: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    def cx(v: float) -> int:
        return int(min(max(round(v), 0), w - 1))

    def cy(v: float) -> int:
        return int(min(max(round(v), 0), h - 1))

    return (cx(min(x1, x2)), cy(min(y1, y2))), (cx(max(x1, x2)), cy(max(y1, y2)))


def _text_color(bg: Color) -> Color:
    b, g, r = bg
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def _label(image: NDArray[np.uint8], corner: tuple[int, int], text: str, color: Color) -> None:
    h, w = image.shape[:2]
    font_scale = max(0.4, min(h, w) / 1200)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    x = min(corner[0], max(0, w - tw - 2))
    y = corner[1] - th - base - 2
    if y < 0:  # no room above the box: put the label inside it
        y = corner[1]
    cv2.rectangle(image, (x, y), (x + tw + 2, y + th + base + 2), color, cv2.FILLED)
    cv2.putText(image, text, (x + 1, y + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, _text_color(color), 1,
                cv2.LINE_AA)


def _caption(image: NDArray[np.uint8], text: str) -> None:
    h, w = image.shape[:2]
    font_scale = max(0.45, min(h, w) / 1000)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    cv2.rectangle(image, (0, 0), (min(w - 1, tw + 8), th + base + 8), (0, 0, 0), cv2.FILLED)
    cv2.putText(image, text, (4, th + 4), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255), 1,
                cv2.LINE_AA)


__all__ = ["CACHED_COLOR", "PALETTE", "REGION_COLOR", "Rect", "annotate", "class_color", "dashed_rectangle"]
