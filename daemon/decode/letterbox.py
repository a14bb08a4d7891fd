"""Ultralytics-compatible letterbox on the CPU, written straight into a slot of the batch tensor.

Same arithmetic as Ultralytics' ``LetterBox`` (center=True, auto=False, scaleup=True) and ``scale_boxes``:
``r = min(H/h, W/w)``, resized to ``(round(w*r), round(h*r))`` with ``cv2.INTER_LINEAR``, gray 114 padding with
``top = round(dh - 0.1)``, ``left = round(dw - 0.1)`` where ``dh, dw`` are half the padding; then BGR -> RGB,
CHW, float32 ``/ 255``. Boxes map back as ``src = (model - pad) / r``, clipped to the image.
"""

from __future__ import annotations

from typing import cast

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.types import Letterbox

PAD_VALUE = 114
_PAD = np.float32(PAD_VALUE) / np.float32(255.0)
_INV = np.float32(255.0)

Size = int | tuple[int, int]  # square side, or (height, width)


def _hw(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h <= 0 or w <= 0:
        raise ValueError(f"letterbox size must be positive, got {size!r}")
    return h, w


def _geometry(src_w: int, src_h: int, size: Size) -> tuple[float, int, int, int, int]:
    """(ratio, new_w, new_h, left, top) exactly as Ultralytics computes them."""
    if src_w <= 0 or src_h <= 0:
        raise ValueError(f"source image must be non-empty, got {src_w}x{src_h}")
    out_h, out_w = _hw(size)
    r = min(out_h / src_h, out_w / src_w)
    new_w, new_h = round(src_w * r), round(src_h * r)
    dw, dh = (out_w - new_w) / 2, (out_h - new_h) / 2
    return r, new_w, new_h, round(dw - 0.1), round(dh - 0.1)


def letterbox_params(src_w: int, src_h: int, size: Size) -> Letterbox:
    """How a ``src_w`` x ``src_h`` image maps into a ``size`` model input: ``model = src * scale + pad``."""
    r, _w, _h, left, top = _geometry(src_w, src_h, size)
    return Letterbox(src_w=src_w, src_h=src_h, scale=r, pad_x=float(left), pad_y=float(top))


def letterbox_into(img_bgr: NDArray[np.uint8], size: Size, out: NDArray[np.float32]) -> Letterbox:
    """Letterbox a BGR HxWx3 uint8 image into ``out`` (float32, shape (3, H, W), e.g. ``batch[i]``).

    ``out`` is fully overwritten: RGB planes scaled to [0, 1], gray 114/255 around the image.
    """
    out_h, out_w = _hw(size)
    if out.shape != (3, out_h, out_w) or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape (3, {out_h}, {out_w}), got {out.dtype} {out.shape}")
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"image must be HxWx3 uint8 BGR, got {img_bgr.dtype} {img_bgr.shape}")
    src_h, src_w = img_bgr.shape[:2]
    r, new_w, new_h, left, top = _geometry(src_w, src_h, size)
    resized = img_bgr
    if (new_w, new_h) != (src_w, src_h):
        resized = cast("NDArray[np.uint8]", cv2.resize(img_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR))
    bottom, right = top + new_h, left + new_w
    out[:, :top, :] = _PAD
    out[:, bottom:, :] = _PAD
    out[:, top:bottom, :left] = _PAD
    out[:, top:bottom, right:] = _PAD
    for c in range(3):  # RGB plane c comes from BGR channel 2 - c
        np.divide(resized[:, :, 2 - c], _INV, out=out[c, top:bottom, left:right], dtype=np.float32)
    return Letterbox(src_w=src_w, src_h=src_h, scale=r, pad_x=float(left), pad_y=float(top))


def boxes_to_source(boxes_xyxy: NDArray[np.float32], lb: Letterbox) -> NDArray[np.float32]:
    """Model-input xyxy boxes (N, 4) -> source-pixel boxes (N, 4), clipped to the source image."""
    b = np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4)
    pad = np.array([lb.pad_x, lb.pad_y, lb.pad_x, lb.pad_y], dtype=np.float32)
    src = (b - pad) / np.float32(lb.scale)
    np.clip(src[:, 0::2], 0, lb.src_w, out=src[:, 0::2])
    np.clip(src[:, 1::2], 0, lb.src_h, out=src[:, 1::2])
    return src
