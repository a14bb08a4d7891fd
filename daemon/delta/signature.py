"""The small luma signature of a letterboxed frame: 1/8 of the model input, uint8, what change maps compare."""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.types import Letterbox

SIGNATURE_FACTOR = 8  # one signature cell per 8x8 model-input pixels


def luma_signature(image_bgr: NDArray[np.uint8], lb: Letterbox, input_size: int) -> NDArray[np.uint8]:
    """Luma of the frame as the model sees it (letterboxed, gray 114 padding), at 1/8 resolution."""
    cells = input_size // SIGNATURE_FACTOR
    sig = np.full((cells, cells), 114, dtype=np.uint8)
    gray = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2GRAY) if image_bgr.ndim == 3 else image_bgr
    w = max(1, round(lb.src_w * lb.scale / SIGNATURE_FACTOR))
    h = max(1, round(lb.src_h * lb.scale / SIGNATURE_FACTOR))
    x0 = min(cells - w, max(0, round(lb.pad_x / SIGNATURE_FACTOR)))
    y0 = min(cells - h, max(0, round(lb.pad_y / SIGNATURE_FACTOR)))
    sig[y0 : y0 + h, x0 : x0 + w] = cv2.resize(gray, (w, h), interpolation=cv2.INTER_AREA)
    return sig
