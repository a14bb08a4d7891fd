"""One fused CuPy kernel: an NVDEC NV12 picture (device) -> letterboxed RGB planes of the engine's dtype, written
straight into a row of the batch buffer.

Colour: the stream's tags, converted as FFmpeg's swscale converts them on the CPU path (PyAV's
``to_ndarray("bgr24")``, which honours the decoded frame's ``colorspace`` and ``color_range``; checked with PyAV 18.1
/ FFmpeg 8.1.2): the matrix from the AVColorSpace number as ``sws_getCoefficients`` maps it (BT.709; FCC; SMPTE
240M; BT.2020; BT.601 for 470BG, 170M and anything unknown or unspecified), limited range (16-235 luma, 16-240
chroma) unless the stream is tagged full range. Chroma is replicated over its 2x2 luma pixels. swscale's fixed-point
tables round low: ``floor(x - 0.5)`` of the exact value fits limited range best (tests/data/vtest30.h264: within 2
levels, 0.31 on average; tests/test_nv12_colour.py), ``floor(x)`` fits full range (within 1 level, ~0.14 on
average). Each of the four source pixels a model pixel samples is converted to 8-bit RGB first, then blended
bilinearly with half-pixel centers and rounded to a level, as ``cv2.resize(INTER_LINEAR)`` does on the CPU path's
uint8 BGR image; padding is gray 114. The geometry comes from daemon.decode.letterbox, so the output matches the
JPEG path's LetterboxBatch (daemon/gpu/kernels.py) for the same pixels.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass
from typing import Any

import numpy as np

from daemon.gpu.kernels import HALF_HELPERS, geometry
from daemon.types import Letterbox

_NV12 = r"""
struct Yuv { float ys, yo, rv, gu, gv, bu, bias; };  // YuvCoefficients, in its field order

__device__ __forceinline__ void yuv2rgb(const unsigned char* y, const unsigned char* uv, int pitch, int uv_pitch,
                                        int px, int py, const Yuv& k, float* rgb) {
    float l = k.ys * ((float)y[(size_t)py * pitch + px] - k.yo);
    const unsigned char* c = uv + (size_t)(py >> 1) * uv_pitch + (px & ~1);
    float u = (float)c[0] - 128.0f, v = (float)c[1] - 128.0f;
    rgb[0] = fminf(fmaxf(floorf(l + k.rv * v + k.bias), 0.0f), 255.0f);
    rgb[1] = fminf(fmaxf(floorf(l - k.gu * u - k.gv * v + k.bias), 0.0f), 255.0f);
    rgb[2] = fminf(fmaxf(floorf(l + k.bu * u + k.bias), 0.0f), 255.0f);
}

extern "C" __global__ void nv12_letterbox(const unsigned char* y, const unsigned char* uv, int sh, int sw,
                                          int pitch, int uv_pitch, OUT_T* dst, int size, int top, int left,
                                          int nh, int nw, float ys, float yo, float rv, float gu, float gv,
                                          float bu, float bias) {
    const Yuv k = {ys, yo, rv, gu, gv, bu, bias};
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int yy = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= size || yy >= size) return;
    size_t plane = (size_t)size * size;
    OUT_T* o = dst + (size_t)yy * size + x;
    int ix = x - left, iy = yy - top;
    float v[3];
    if (ix < 0 || iy < 0 || ix >= nw || iy >= nh) {
        v[0] = v[1] = v[2] = 114.0f;
    } else {
        float fx = (float)((ix + 0.5) * ((double)sw / nw) - 0.5);
        float fy = (float)((iy + 0.5) * ((double)sh / nh) - 0.5);
        fx = fminf(fmaxf(fx, 0.0f), (float)(sw - 1));
        fy = fminf(fmaxf(fy, 0.0f), (float)(sh - 1));
        int x0 = (int)fx, y0 = (int)fy;
        int x1 = min(x0 + 1, sw - 1), y1 = min(y0 + 1, sh - 1);
        float ax = fx - x0, ay = fy - y0;
        float p00[3], p01[3], p10[3], p11[3];
        yuv2rgb(y, uv, pitch, uv_pitch, x0, y0, k, p00);
        yuv2rgb(y, uv, pitch, uv_pitch, x1, y0, k, p01);
        yuv2rgb(y, uv, pitch, uv_pitch, x0, y1, k, p10);
        yuv2rgb(y, uv, pitch, uv_pitch, x1, y1, k, p11);
        for (int c = 0; c < 3; ++c) {
            float t = (p00[c] * (1.0f - ax) + p01[c] * ax) * (1.0f - ay) + (p10[c] * (1.0f - ax) + p11[c] * ax) * ay;
            v[c] = floorf(t + 0.5f);
        }
    }
    o[0] = STORE(v[0] / 255.0f);
    o[plane] = STORE(v[1] / 255.0f);
    o[2 * plane] = STORE(v[2] / 255.0f);
}
"""


# (Kr, Kb) of the matrices swscale knows, by FFmpeg's AVColorSpace number (sws_getCoefficients); others: BT.601
_KR_KB = {1: (0.2126, 0.0722), 4: (0.30, 0.11), 7: (0.212, 0.087), 9: (0.2627, 0.0593), 10: (0.2627, 0.0593)}
BT601 = (0.299, 0.114)
UNSPECIFIED = 2  # AVCOL_SPC_UNSPECIFIED


@dataclass(frozen=True, slots=True)
class YuvCoefficients:
    """Y'CbCr -> R'G'B' as the kernel computes it (levels; u, v centred on 128):
    ``l = ys * (Y - yo)``; ``R = l + rv v``, ``G = l - gu u - gv v``, ``B = l + bu u``; each ``floor(. + bias)``
    clamped to 0..255."""

    ys: float
    yo: float
    rv: float
    gu: float
    gv: float
    bu: float
    bias: float


def yuv_coefficients(colorspace: int = UNSPECIFIED, full_range: bool = False) -> YuvCoefficients:
    """The conversion swscale applies to a picture tagged ``colorspace`` (AVColorSpace) and range."""
    kr, kb = _KR_KB.get(colorspace, BT601)
    kg = 1.0 - kr - kb
    ys, yo, cs = (1.0, 0.0, 1.0) if full_range else (255.0 / 219.0, 16.0, 255.0 / 224.0)
    return YuvCoefficients(ys, yo, 2.0 * (1.0 - kr) * cs, 2.0 * (1.0 - kb) * kb / kg * cs,
                           2.0 * (1.0 - kr) * kr / kg * cs, 2.0 * (1.0 - kb) * cs, 0.0 if full_range else -0.5)


def nv12_planes(nv12: Any, width: int, height: int) -> tuple[int, int, int, int]:
    """(luma pointer, chroma pointer, luma pitch, chroma pitch) of an NV12 picture given as one device array of
    shape (>= height * 3 / 2, >= width) uint8 with the chroma plane right after ``height`` luma rows (what
    PyNvVideoCodec's DLPack export is: (h * 3 / 2, w), pitch = w, measured on an H200)."""
    cai = nv12.__cuda_array_interface__
    shape = tuple(int(d) for d in cai["shape"])
    if cai["typestr"] != "|u1" or len(shape) != 2:
        raise ValueError(f"NV12 picture must be a 2-D uint8 array, got {cai['typestr']} {shape}")
    strides = cai.get("strides")
    pitch = int(strides[0]) if strides else shape[1]
    if strides and int(strides[1]) != 1:
        raise ValueError(f"NV12 rows must be contiguous, strides {strides}")
    if width % 2 or height % 2 or width > shape[1] or shape[0] < height * 3 // 2:
        raise ValueError(f"NV12 picture {shape} cannot hold {width}x{height} (even sizes only)")
    ptr = int(cai["data"][0])
    return ptr, ptr + height * pitch, pitch, pitch


class Nv12Letterbox:
    """NV12 (device) -> one (3, size, size) row of the batch buffer (FP32 or FP16), one launch per picture."""

    def __init__(self, dtype: Any) -> None:
        import cupy

        kind = np.dtype(dtype)
        if kind not in (np.dtype(np.float16), np.dtype(np.float32)):
            raise ValueError(f"model input dtype must be float16 or float32, got {kind}")
        half = kind == np.dtype(np.float16)
        src = HALF_HELPERS + _NV12.replace("OUT_T", "unsigned short" if half else "float").replace(
            "STORE", "f2h" if half else "f2f")
        self._kernel = cupy.RawModule(code=src).get_function("nv12_letterbox")
        self.dtype = np.float16 if half else np.float32

    def __call__(self, nv12: Any, width: int, height: int, out: Any, stream: Any,
                 colour: YuvCoefficients | None = None) -> Letterbox:
        """Letterbox a ``width`` x ``height`` NV12 picture into ``out`` (3, size, size) of this kernel's dtype,
        on ``stream``, converted with ``colour`` (default: BT.601 limited range, an untagged stream's). ``nv12``
        must stay valid until the launch has run on ``stream``."""
        size = int(out.shape[-1])
        if out.dtype != self.dtype or tuple(out.shape) != (3, size, size) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a contiguous (3, {size}, {size}) {np.dtype(self.dtype)} row, got "
                             f"{out.dtype} {tuple(out.shape)}")
        y, uv, pitch, uv_pitch = nv12_planes(nv12, width, height)
        lb, nw, nh = geometry(width, height, size)
        i32 = np.int32
        with stream:
            self._kernel(((size + 31) // 32, (size + 7) // 8), (32, 8),
                         (np.uint64(y), np.uint64(uv), i32(height), i32(width), i32(pitch), i32(uv_pitch), out,
                          i32(size), i32(int(lb.pad_y)), i32(int(lb.pad_x)), i32(nh), i32(nw),
                          *(np.float32(c) for c in astuple(colour or yuv_coefficients()))))
        return lb
