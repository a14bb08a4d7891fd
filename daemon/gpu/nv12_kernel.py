"""One fused CuPy kernel: an NVDEC NV12 picture (device) -> letterboxed RGB planes of the engine's dtype, written
straight into a row of the batch buffer.

Colour: BT.601 limited range (16-235 luma, 16-240 chroma), chroma replicated over its 2x2 luma pixels: what
FFmpeg's swscale does for the CPU path (PyAV ``to_ndarray("bgr24")`` and OpenCV's FFmpeg reader on a stream
without colour description). swscale's fixed-point SIMD rounds low: ``floor(x - 0.5)`` of the exact BT.601 value
fits it best (measured with PyAV 18 on tests/data/vtest30.h264: within 2 levels, 0.31 on average, bias +0.1;
plain rounding was 1.07 on average). Each of the four source pixels a model pixel samples is converted to 8-bit RGB
first, then blended bilinearly with half-pixel centers and rounded to a level, as ``cv2.resize(INTER_LINEAR)`` does
on the CPU path's uint8 BGR image; padding is gray 114. The geometry comes from daemon.decode.letterbox, so the
output matches the JPEG path's LetterboxBatch (daemon/gpu/kernels.py) for the same pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon.gpu.kernels import HALF_HELPERS, geometry
from daemon.types import Letterbox

_NV12 = r"""
__device__ __forceinline__ void yuv2rgb(const unsigned char* y, const unsigned char* uv, int pitch, int uv_pitch,
                                        int px, int py, float* rgb) {
    float l = 1.164383f * ((float)y[(size_t)py * pitch + px] - 16.0f);
    const unsigned char* c = uv + (size_t)(py >> 1) * uv_pitch + (px & ~1);
    float u = (float)c[0] - 128.0f, v = (float)c[1] - 128.0f;
    rgb[0] = fminf(fmaxf(floorf(l + 1.596027f * v - 0.5f), 0.0f), 255.0f);
    rgb[1] = fminf(fmaxf(floorf(l - 0.391762f * u - 0.812968f * v - 0.5f), 0.0f), 255.0f);
    rgb[2] = fminf(fmaxf(floorf(l + 2.017232f * u - 0.5f), 0.0f), 255.0f);
}

extern "C" __global__ void nv12_letterbox(const unsigned char* y, const unsigned char* uv, int sh, int sw,
                                          int pitch, int uv_pitch, OUT_T* dst, int size, int top, int left,
                                          int nh, int nw) {
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
        yuv2rgb(y, uv, pitch, uv_pitch, x0, y0, p00);
        yuv2rgb(y, uv, pitch, uv_pitch, x1, y0, p01);
        yuv2rgb(y, uv, pitch, uv_pitch, x0, y1, p10);
        yuv2rgb(y, uv, pitch, uv_pitch, x1, y1, p11);
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

    def __call__(self, nv12: Any, width: int, height: int, out: Any, stream: Any) -> Letterbox:
        """Letterbox a ``width`` x ``height`` NV12 picture into ``out`` (3, size, size) of this kernel's dtype,
        on ``stream``. ``nv12`` must stay valid until the launch has run on ``stream``."""
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
                          i32(size), i32(int(lb.pad_y)), i32(int(lb.pad_x)), i32(nh), i32(nw)))
        return lb
