"""JPEG bytes -> BGR pixels on the CPU, with the size checked from the header before any decoding.

Strictness (a decision): a JPEG whose entropy-coded data is cut short or damaged is rejected as ``corrupt``
rather than decoded into a partly gray or smeared image, because detections on such a frame are garbage.
simplejpeg runs with ``strict=True``: libjpeg-turbo's recoverable warnings ("premature end of data segment",
"corrupt JPEG data") become errors, and there is no lenient retry. OpenCV is used only where simplejpeg is not
installed; ``cv2.imdecode`` has no strict mode and silently fills a truncated scan with gray, so on that path we
require the EOI marker at the end (which catches truncation, not damage inside the scan).
"""

from __future__ import annotations

from typing import Literal, cast

import cv2
import numpy as np
from numpy.typing import NDArray

DecodeErrorKind = Literal["empty", "corrupt", "too_large"]

# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic...). Not C4 (DHT), C8 (JPG), CC (DAC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# Markers that stand alone, without a length field.
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})
_SOS = 0xDA
_EOI = 0xD9


class DecodeError(Exception):
    """A frame could not be decoded; ``kind`` is "empty", "corrupt" or "too_large" (as in FrameError)."""

    def __init__(self, kind: DecodeErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: DecodeErrorKind = kind


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first SOF marker, without decoding any pixels."""
    if not data:
        raise DecodeError("empty", "JPEG data is empty (0 bytes)")
    if data[:2] != b"\xff\xd8":
        raise DecodeError("corrupt", f"not a JPEG: starts with {data[:4].hex()} instead of ffd8 (SOI)")
    n = len(data)
    i = 2
    while True:
        # Markers are 0xFF, any number of 0xFF fill bytes, then the marker code.
        if i >= n or data[i] != 0xFF:
            raise DecodeError("corrupt", _where(data, i, "expected a marker"))
        while i < n and data[i] == 0xFF:
            i += 1
        if i >= n:
            raise DecodeError("corrupt", _where(data, i, "truncated header"))
        marker = data[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker in (_SOS, _EOI):
            raise DecodeError("corrupt", _where(data, i, f"marker {marker:02x} before any SOF (frame) header"))
        if i + 2 > n:
            raise DecodeError("corrupt", _where(data, i, "truncated header"))
        length = int.from_bytes(data[i : i + 2], "big")
        if length < 2 or i + length > n:
            raise DecodeError("corrupt", _where(data, i, f"segment {marker:02x} of length {length} is truncated"))
        if marker in _SOF:
            if length < 8:
                raise DecodeError("corrupt", _where(data, i, f"SOF segment too short ({length})"))
            height = int.from_bytes(data[i + 3 : i + 5], "big")
            width = int.from_bytes(data[i + 5 : i + 7], "big")
            if width == 0 or height == 0:
                raise DecodeError("corrupt", f"JPEG header declares an empty image {width}x{height}")
            return width, height
        i += length


def _where(data: bytes, offset: int, what: str) -> str:
    return f"bad JPEG header ({len(data)} bytes): {what} at offset {offset}"


def decode_jpeg(data: bytes, max_pixels: int) -> NDArray[np.uint8]:
    """Decode JPEG bytes to a BGR HxWx3 uint8 array.

    Raises :class:`DecodeError`: ``empty`` for no data, ``too_large`` when the header declares more than
    ``max_pixels`` pixels (checked before decoding, against decompression bombs), ``corrupt`` otherwise.
    """
    width, height = jpeg_size(data)
    if width * height > max_pixels:
        raise DecodeError("too_large", f"JPEG of {width}x{height} = {width * height} px exceeds max_pixels "
                                       f"{max_pixels}")
    image = _decode_simplejpeg(data)
    if image is None:
        image = _decode_opencv(data)
    if image.shape[:2] != (height, width):
        raise DecodeError("corrupt", f"decoded {image.shape[1]}x{image.shape[0]} but header says {width}x{height}")
    return image


def _decode_simplejpeg(data: bytes) -> NDArray[np.uint8] | None:
    """The decoded image; None when simplejpeg is not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        image: NDArray[np.uint8] = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)
    except ValueError as exc:
        raise DecodeError("corrupt", f"corrupt or truncated JPEG ({len(data)} bytes): {exc}") from exc
    return image


def _decode_opencv(data: bytes) -> NDArray[np.uint8]:
    if not _ends_with_eoi(data):
        raise DecodeError("corrupt", f"truncated JPEG ({len(data)} bytes): no EOI marker at the end")
    image = cast("NDArray[np.uint8] | None", cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))
    if image is None:
        raise DecodeError("corrupt", f"corrupt JPEG ({len(data)} bytes): OpenCV could not decode it")
    return image


def _ends_with_eoi(data: bytes) -> bool:
    """True when the data ends with FFD9 (allowing trailing NUL/whitespace padding some cameras add)."""
    return data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
