"""daemon.decode: JPEG header parsing and strict decoding on real JPEG bytes; the Ultralytics letterbox."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from daemon.decode.jpeg import DecodeError, decode_jpeg, jpeg_size
from daemon.decode.letterbox import boxes_to_source, letterbox_into, letterbox_params
from daemon.types import Letterbox

BIG = 100_000_000


@pytest.fixture(scope="module")
def bus(bus_path: Path) -> bytes:
    return bus_path.read_bytes()


def _sof_offset(data: bytes) -> int:
    """Offset of the SOF0 segment's length field in a baseline JPEG."""
    return data.index(b"\xff\xc0") + 2


# -- jpeg_size ------------------------------------------------------------------------------------------------
def test_jpeg_size_of_real_photos(bus: bytes, zidane_path: Path) -> None:
    assert jpeg_size(bus) == (810, 1080)
    assert jpeg_size(zidane_path.read_bytes()) == (1280, 720)


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        (b"", "empty", "empty"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "corrupt", "not a JPEG"),
        (b"\xff\xd8", "corrupt", "expected a marker"),
        (b"\xff\xd8\xff", "corrupt", "truncated header"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "corrupt", "truncated"),
        (b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 6, "corrupt", "before any SOF"),
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x00\x00\x00\x10\x03" + b"\0" * 9, "corrupt", "empty image 16x0"),
    ],
)
def test_jpeg_size_rejects(data: bytes, kind: str, message: str) -> None:
    with pytest.raises(DecodeError, match=message) as err:
        jpeg_size(data)
    assert err.value.kind == kind


# -- decode_jpeg ----------------------------------------------------------------------------------------------
def test_decode_real_jpeg_matches_opencv(bus: bytes) -> None:
    img = decode_jpeg(bus, BIG)
    assert img.shape == (1080, 810, 3)
    assert img.dtype == np.uint8
    ref = np.asarray(cv2.imdecode(np.frombuffer(bus, np.uint8), cv2.IMREAD_COLOR), dtype=np.uint8)
    assert float(np.abs(img.astype(np.int16) - ref).mean()) < 1.0  # same libjpeg-turbo up to rounding


def test_decode_max_pixels_is_inclusive(bus: bytes) -> None:
    assert decode_jpeg(bus, 810 * 1080).shape == (1080, 810, 3)
    with pytest.raises(DecodeError, match="810x1080 = 874800 px exceeds max_pixels 874799") as err:
        decode_jpeg(bus, 810 * 1080 - 1)
    assert err.value.kind == "too_large"


def test_decompression_bomb_rejected_before_decoding(bus: bytes) -> None:
    """A real JPEG whose header claims 60000x60000 (3.6 Gpx) is refused from the header alone."""
    i = _sof_offset(bus)
    bomb = bus[: i + 3] + (60000).to_bytes(2, "big") + (60000).to_bytes(2, "big") + bus[i + 7 :]
    assert jpeg_size(bomb) == (60000, 60000)
    t0 = time.perf_counter()
    with pytest.raises(DecodeError) as err:
        decode_jpeg(bomb, 40_000_000)
    assert err.value.kind == "too_large"
    assert "60000x60000" in str(err.value)
    assert time.perf_counter() - t0 < 0.05


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_jpeg_is_corrupt(bus: bytes, keep: float) -> None:
    """Strict: a cut-off scan is an error, never a partly gray image."""
    with pytest.raises(DecodeError) as err:
        decode_jpeg(bus[: int(len(bus) * keep)], BIG)
    assert err.value.kind == "corrupt"


def test_missing_eoi_is_corrupt(bus: bytes) -> None:
    assert bus.endswith(b"\xff\xd9")
    with pytest.raises(DecodeError) as err:
        decode_jpeg(bus[:-2], BIG)
    assert err.value.kind == "corrupt"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"", "empty"),
        (bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)), "corrupt"),
        (b"\xff\xd8" + bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8)), "corrupt"),
    ],
)
def test_decode_rejects_garbage(data: bytes, kind: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode_jpeg(data, BIG)
    assert err.value.kind == kind


def test_corrupt_scan_data_is_rejected(bus: bytes) -> None:
    """Header intact, entropy-coded data overwritten with noise (EOI kept)."""
    start = bus.index(b"\xff\xda") + 200
    noise = bytes(np.random.default_rng(3).integers(0, 256, 20_000, dtype=np.uint8))
    with pytest.raises(DecodeError) as err:
        decode_jpeg(bus[:start] + noise + b"\xff\xd9", BIG)
    assert err.value.kind == "corrupt"


def test_grayscale_jpeg_comes_back_bgr() -> None:
    gray = (np.arange(64 * 48, dtype=np.uint32).reshape(48, 64) % 256).astype(np.uint8)
    ok, enc = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    img = decode_jpeg(enc.tobytes(), BIG)
    assert img.shape == (48, 64, 3)
    assert np.array_equal(img[..., 0], img[..., 2])


def test_trailing_padding_after_eoi_is_accepted(bus: bytes) -> None:
    assert decode_jpeg(bus + b"\x00\x00\r\n", BIG).shape == (1080, 810, 3)


# -- letterbox ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("src_w", "src_h", "size", "scale", "pad_x", "pad_y"),
    [
        (810, 1080, 640, 640 / 1080, 80.0, 0.0),  # bus: 480x640 inside, 160 px of side padding
        (1280, 720, 640, 0.5, 0.0, 140.0),  # zidane: 640x360
        (768, 576, 640, 640 / 768, 0.0, 80.0),  # vtest
        (640, 640, 640, 1.0, 0.0, 0.0),
        (100, 37, 640, 6.4, 0.0, 201.0),  # 640x237: dh = 201.5 -> top = round(201.4) = 201, bottom 202
        (1000, 999, 640, 640 / 1000, 0.0, 0.0),  # 640x639: dh = 0.5 -> top 0, bottom 1
        (100, 40, (320, 640), 6.4, 0.0, 32.0),  # non-square input (h, w)
    ],
)
def test_letterbox_params(
    src_w: int, src_h: int, size: int | tuple[int, int], scale: float, pad_x: float, pad_y: float
) -> None:
    lb = letterbox_params(src_w, src_h, size)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    r = min(out_h / src_h, out_w / src_w)
    # Ultralytics' own arithmetic, spelled out independently of the module.
    new_w, new_h = round(src_w * r), round(src_h * r)
    assert lb == Letterbox(src_w, src_h, r, float(round((out_w - new_w) / 2 - 0.1)),
                           float(round((out_h - new_h) / 2 - 0.1)))
    assert lb.scale == pytest.approx(scale)
    assert (lb.pad_x, lb.pad_y) == (pad_x, pad_y)


def _ultralytics_style(img: np.ndarray, size: int) -> np.ndarray:
    """The reference recipe: LetterBox (resize + copyMakeBorder 114) then [..., ::-1].transpose / 255."""
    h, w = img.shape[:2]
    r = min(size / h, size / w)
    new_w, new_h = round(w * r), round(h * r)
    dw, dh = (size - new_w) / 2, (size - new_h) / 2
    if (new_w, new_h) != (w, h):
        img = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    img = cv2.copyMakeBorder(img, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(114, 114, 114))
    chw = np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1))
    return chw.astype(np.float32) / np.float32(255)


@pytest.mark.parametrize("shape", [(1080, 810), (720, 1280), (37, 100), (999, 1000), (640, 640), (300, 200)])
def test_letterbox_into_matches_reference_recipe(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    batch = np.full((3, 3, 640, 640), -1.0, dtype=np.float32)
    lb = letterbox_into(img, 640, batch[1])
    assert np.array_equal(batch[1], _ultralytics_style(img, 640))
    assert (batch[0] == -1).all()
    assert (batch[2] == -1).all()  # neighbours untouched
    assert lb == letterbox_params(shape[1], shape[0], 640)


def test_letterbox_into_real_photo(bus: bytes) -> None:
    img = decode_jpeg(bus, BIG)
    out = np.empty((3, 640, 640), dtype=np.float32)
    letterbox_into(img, 640, out)
    assert np.array_equal(out, _ultralytics_style(img, 640))
    assert out[:, :, :80].max() == out[:, :, :80].min() == np.float32(114) / np.float32(255)


@pytest.mark.parametrize(
    ("out_shape", "dtype", "img_shape", "message"),
    [
        ((3, 320, 320), np.float32, (10, 10, 3), r"out must be float32 of shape \(3, 640, 640\)"),
        ((3, 640, 640), np.float64, (10, 10, 3), "out must be float32"),
        ((3, 640, 640), np.float32, (10, 10), "image must be HxWx3"),
    ],
)
def test_letterbox_into_rejects_bad_arguments(
    out_shape: tuple[int, ...], dtype: type, img_shape: tuple[int, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        letterbox_into(np.zeros(img_shape, np.uint8), 640, np.zeros(out_shape, dtype))


def test_boxes_to_source_inverts_and_clips() -> None:
    lb = letterbox_params(1280, 720, 640)  # scale 0.5, pad_y 140
    boxes = np.array([[10, 150, 110, 250], [-5, 100, 700, 600]], dtype=np.float32)
    src = boxes_to_source(boxes, lb)
    assert src.dtype == np.float32
    np.testing.assert_allclose(src[0], [20, 20, 220, 220])
    np.testing.assert_allclose(src[1], [0, 0, 1280, 720])  # clipped to the image
    assert boxes_to_source(np.zeros((0, 4), np.float32), lb).shape == (0, 4)


def test_opencv_path_when_simplejpeg_is_missing(bus: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # makes `import simplejpeg` raise ImportError
    img = decode_jpeg(bus, BIG)
    assert np.array_equal(img, np.asarray(cv2.imdecode(np.frombuffer(bus, np.uint8), cv2.IMREAD_COLOR)))
    with pytest.raises(DecodeError, match="no EOI marker") as err:
        decode_jpeg(bus[: len(bus) // 2], BIG)
    assert err.value.kind == "corrupt"
