"""The NV12 -> RGB colour of the NVDEC path against the CPU path's (PyAV ``to_ndarray("bgr24")``, i.e. swscale),
on small H.264/H.265 streams encoded here with each colour tag: AvSource's packets carry the stream's tags, and a
numpy copy of the kernel's arithmetic (daemon.gpu.nv12_kernel, with ``yuv_coefficients`` of those tags) applied to
the decoded planes lands within a level or two of swscale's BGR. The kernel itself on the device: the gpu test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from test_sources_replay import Collect, wait_for

from daemon.gpu.nv12_kernel import YuvCoefficients, yuv_coefficients
from daemon.sources.av import AvSource

W, H = 64, 48
# (encoder, AVColorSpace tag or None, AVColorRange tag or None) -> the (colorspace, full range) the packets carry
CASES = [
    ("libx264", None, None, (2, False)),  # untagged: swscale's default, BT.601 limited
    ("libx264", 5, 1, (5, False)),  # BT.601 (470BG) limited
    ("libx264", 1, 1, (1, False)),  # BT.709 limited
    ("libx264", 1, 2, (1, True)),  # BT.709 full (the H.264 decoder picks yuvj420p)
    ("libx264", 6, 2, (6, True)),  # BT.601 (170M) full
    ("libx265", 9, 1, (9, False)),  # BT.2020 limited (H.265)
    ("libx265", 1, 2, (1, True)),  # BT.709 full (H.265)
]


def encode(path: Path, encoder: str, colorspace: int | None, color_range: int | None, n: int = 4) -> None:
    """``n`` pictures of random Y/U/V levels (every level, saturating corners included), tagged as given."""
    if encoder not in av.codecs_available:
        pytest.skip(f"this FFmpeg has no {encoder}")
    rng = np.random.default_rng(7)
    with av.open(str(path), "w") as out:
        st = out.add_stream(encoder, rate=25)
        st.width, st.height, st.pix_fmt = W, H, "yuv420p"
        if colorspace is not None:
            st.codec_context.colorspace = colorspace
        if color_range is not None:
            st.codec_context.color_range = color_range
        st.options = {"preset": "ultrafast", "crf": "10"} | ({"x265-params": "log-level=none"}
                                                             if encoder == "libx265" else {})
        for _ in range(n):
            yuv = rng.integers(0, 256, (H * 3 // 2, W), dtype=np.uint8)
            for p in st.encode(av.VideoFrame.from_ndarray(yuv, format="yuv420p")):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)


def planes(frame: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y, U, V of a decoded 4:2:0 frame as they are (no conversion), without line padding."""
    y, u, v = (np.frombuffer(bytes(p), np.uint8).reshape(p.height, p.line_size)[:, : p.width] for p in frame.planes)
    return y, u, v


def kernel_rgb(y: np.ndarray, u: np.ndarray, v: np.ndarray, k: YuvCoefficients) -> np.ndarray:
    """daemon/gpu/nv12_kernel.py's yuv2rgb in float32 numpy, chroma replicated over 2x2: (H, W, 3) RGB levels."""
    f = np.float32
    cu = np.repeat(np.repeat(u.astype(f) - f(128), 2, 0), 2, 1)
    cv = np.repeat(np.repeat(v.astype(f) - f(128), 2, 0), 2, 1)
    lum = f(k.ys) * (y.astype(f) - f(k.yo))
    rgb = (lum + f(k.rv) * cv, lum - f(k.gu) * cu - f(k.gv) * cv, lum + f(k.bu) * cu)
    return np.stack([np.clip(np.floor(c + f(k.bias)), 0, 255) for c in rgb], axis=-1)


def _packets(path: Path) -> list[Any]:
    sink = Collect()
    src = AvSource("cam", str(path), sink, packets=True, realtime=False, loop=False)
    src.start()
    assert wait_for(lambda: not src.alive, 20.0)
    return [f.packet for f in sink.frames if f.packet is not None]


@pytest.mark.parametrize(("encoder", "colorspace", "color_range", "tags"), CASES)
def test_kernel_colour_matches_the_cpu_path(tmp_path: Path, encoder: str, colorspace: int | None,
                                            color_range: int | None, tags: tuple[int, bool]) -> None:
    path = tmp_path / "c.mkv"
    encode(path, encoder, colorspace, color_range)
    pk = _packets(path)
    assert pk and {(p.colorspace, p.full_range) for p in pk} == {tags}  # what the GPU side gets
    k = yuv_coefficients(*tags)
    untagged = yuv_coefficients()
    with av.open(str(path)) as c:
        for frame in c.decode(video=0):
            cpu = frame.to_ndarray(format="bgr24")[..., ::-1].astype(np.int16)  # the CPU path's conversion
            y, u, v = planes(frame)
            diff = np.abs(kernel_rgb(y, u, v, k) - cpu)
            assert float(diff.max()) <= (1 if tags[1] else 2), float(diff.max())
            assert float(diff.mean()) < 0.35, float(diff.mean())
            if tags != (2, False) and tags != (5, False):  # the old conversion (BT.601 limited) was far off
                assert float(np.abs(kernel_rgb(y, u, v, untagged) - cpu).max()) > 10


@pytest.mark.parametrize(("colorspace", "full"), [(2, False), (0, False), (5, True), (6, False), (8, True)])
def test_unknown_and_bt601_tags_convert_as_bt601(colorspace: int, full: bool) -> None:
    """swscale's sws_getCoefficients: anything it has no matrix for (here RGB 0, YCgCo 8, unspecified 2) is BT.601."""
    assert yuv_coefficients(colorspace, full) == yuv_coefficients(5, full)


def test_coefficients_of_the_common_tags() -> None:
    old = yuv_coefficients()  # the kernel's constants before it took tags
    assert (round(old.ys, 6), old.yo, round(old.rv, 6), round(old.gu, 6), round(old.gv, 6), round(old.bu, 6),
            old.bias) == (1.164384, 16.0, 1.596027, 0.391762, 0.812968, 2.017232, -0.5)
    full709 = yuv_coefficients(1, True)
    assert (full709.ys, full709.yo, full709.rv, round(full709.bu, 4), full709.bias) == (1.0, 0.0, 1.5748, 1.8556, 0.0)


@pytest.mark.gpu
@pytest.mark.parametrize(("encoder", "colorspace", "color_range", "tags"), CASES)
def test_device_kernel_equals_its_numpy_copy(tmp_path: Path, encoder: str, colorspace: int | None,
                                             color_range: int | None, tags: tuple[int, bool]) -> None:
    """At scale 1 (64x48 into 64: no resampling) the kernel's FP32 rows are the numpy copy's levels / 255, with
    the gray band below the picture."""
    import cupy

    from daemon.gpu.nv12_kernel import Nv12Letterbox

    path = tmp_path / "c.mkv"
    encode(path, encoder, colorspace, color_range)
    kernel = Nv12Letterbox(np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with av.open(str(path)) as c:
        frame = next(c.decode(video=0))
    y, u, v = planes(frame)
    nv12 = cupy.asarray(np.concatenate([y, np.stack([u, v], axis=-1).reshape(H // 2, W)]))
    out = cupy.zeros((3, W, W), cupy.float32)
    lb = kernel(nv12, W, H, out, stream, yuv_coefficients(*tags))
    stream.synchronize()
    assert (lb.scale, lb.pad_x, lb.pad_y) == (1.0, 0.0, 8.0)
    got = cupy.asnumpy(out)[:, 8 : 8 + H] * 255
    want = kernel_rgb(y, u, v, yuv_coefficients(*tags)).transpose(2, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-3)
