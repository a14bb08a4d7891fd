"""CPU stage 1: JPEG bytes (or raw pixels) -> letterboxed model input, written into a reused batch buffer."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from daemon.decode.jpeg import DecodeError, decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.pipeline.settings import CameraSettings
from daemon.types import Frame, FrameError, Letterbox


@dataclass(frozen=True, slots=True)
class Prepared:
    """A frame that made it into the batch at index ``slot``."""

    frame: Frame
    slot: int
    letterbox: Letterbox
    offset: tuple[int, int]  # ROI origin in source pixels
    src_w: int
    src_h: int
    bytes_decoded: int
    decode_s: float
    image: NDArray[np.uint8]  # the decoded source frame (previews use it)


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    tensor: NDArray[np.float32]  # (max_batch, 3, H, W); rows [0, len(items)) are valid
    items: tuple[Prepared, ...]
    errors: tuple[FrameError, ...]


class CpuPreparer:
    """Decodes and letterboxes frames on the CPU into a caller-supplied batch buffer."""

    def __init__(self, input_size: int, max_pixels: int, max_jpeg_bytes: int) -> None:
        self._size = input_size
        self._max_pixels = max_pixels
        self._max_jpeg_bytes = max_jpeg_bytes

    def prepare(
        self,
        frames: Sequence[Frame],
        buffer: NDArray[np.float32],
        settings_of: Callable[[str], CameraSettings | None],
    ) -> PreparedBatch:
        items: list[Prepared] = []
        errors: list[FrameError] = []
        for frame in frames:
            t0 = time.perf_counter()
            try:
                image = self._decode(frame)
            except DecodeError as exc:
                errors.append(FrameError(frame.camera, frame.seq, exc.kind, str(exc)))
                continue
            src_h, src_w = image.shape[:2]
            settings = settings_of(frame.camera)
            view, offset = _apply_roi_and_mask(image, settings)
            slot = len(items)
            lb = letterbox_into(view, self._size, buffer[slot])
            items.append(
                Prepared(frame, slot, lb, offset, src_w, src_h, int(image.nbytes), time.perf_counter() - t0, image)
            )
        return PreparedBatch(buffer, tuple(items), tuple(errors))

    def _decode(self, frame: Frame) -> NDArray[np.uint8]:
        if frame.pixels is not None:
            px = frame.pixels
            if px.ndim != 3 or px.shape[2] != 3 or px.dtype != np.uint8:
                raise DecodeError("corrupt", f"raw frame must be HxWx3 uint8, got {px.shape} {px.dtype}")
            if px.shape[0] * px.shape[1] > self._max_pixels:
                raise DecodeError("too_large", f"frame {px.shape[1]}x{px.shape[0]} exceeds {self._max_pixels} px")
            return px
        data = frame.jpeg or b""
        if len(data) > self._max_jpeg_bytes:
            raise DecodeError("too_large", f"JPEG of {len(data)} bytes exceeds {self._max_jpeg_bytes}")
        return decode_jpeg(data, self._max_pixels)


def _apply_roi_and_mask(
    image: NDArray[np.uint8], settings: CameraSettings | None
) -> tuple[NDArray[np.uint8], tuple[int, int]]:
    if settings is None:
        return image, (0, 0)
    if settings.mask:
        image = image.copy() if not image.flags.writeable else image
        cv2.fillPoly(image, list(settings.mask), (114, 114, 114))
    if settings.roi is None:
        return image, (0, 0)
    h, w = image.shape[:2]
    x1, y1, x2, y2 = settings.roi
    x1, x2 = min(max(x1, 0), w - 1), min(max(x2, 1), w)
    y1, y2 = min(max(y1, 0), h - 1), min(max(y2, 1), h)
    if x2 <= x1 or y2 <= y1:
        return image, (0, 0)
    return image[y1:y2, x1:x2], (x1, y1)
