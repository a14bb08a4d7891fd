"""Small CUDA pieces shared by the GPU decoders and the pipeline: the fused letterbox kernel, the luma signature
kernel, pinned host staging, and what a decoder hands back. Everything here needs CuPy, imported lazily.

The letterbox kernel is one pass per batch: for every output pixel of every image it either writes gray 114 (the
padding) or samples the decoded uint8 HWC image bilinearly (half-pixel centers, clamped edges, rounded to an
integer level like cv2.resize(INTER_LINEAR) on uint8), reorders to RGB planes, scales by 1/255 and stores FP32 or
FP16. The geometry comes from daemon.decode.letterbox, so the output matches the CPU letterbox to a level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.decode.letterbox import letterbox_params
from daemon.types import Letterbox

TABLE_COLS = 10  # ptr, h, w, row pitch, new h, new w, top, left, bgr, unused
SIGNATURE_FACTOR = 8

# float <-> half bit patterns, and the identity: for kernels templated on their input or output dtype
HALF_HELPERS = r"""
__device__ __forceinline__ unsigned short f2h(float f) {
    unsigned short h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h;
}
__device__ __forceinline__ float h2f(unsigned short h) {
    float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f;
}
__device__ __forceinline__ float f2f(float f) { return f; }
"""

_LETTERBOX = r"""
extern "C" __global__ void letterbox(const long long* table, OUT_T* dst, int size) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    int z = blockIdx.z;
    if (x >= size || y >= size) return;
    const long long* g = table + (size_t)z * 10;
    const unsigned char* src = (const unsigned char*)g[0];
    int sh = (int)g[1], sw = (int)g[2], pitch = (int)g[3], nh = (int)g[4], nw = (int)g[5];
    int top = (int)g[6], left = (int)g[7], bgr = (int)g[8];
    size_t plane = (size_t)size * size;
    OUT_T* o = dst + (size_t)z * 3 * plane + (size_t)y * size + x;
    int ix = x - left, iy = y - top;
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
        const unsigned char* r0 = src + (size_t)y0 * pitch;
        const unsigned char* r1 = src + (size_t)y1 * pitch;
        for (int c = 0; c < 3; ++c) {
            int sc = bgr ? 2 - c : c;
            float p00 = r0[x0 * 3 + sc], p01 = r0[x1 * 3 + sc], p10 = r1[x0 * 3 + sc], p11 = r1[x1 * 3 + sc];
            float t = (p00 * (1.0f - ax) + p01 * ax) * (1.0f - ay) + (p10 * (1.0f - ax) + p11 * ax) * ay;
            v[c] = floorf(t + 0.5f);
        }
    }
    o[0] = STORE(v[0] / 255.0f);
    o[plane] = STORE(v[1] / 255.0f);
    o[2 * plane] = STORE(v[2] / 255.0f);
}
"""

_LUMA = r"""
extern "C" __global__ void luma(const IN_T* src, unsigned char* sig, int size, int f) {
    int cx = blockIdx.x * blockDim.x + threadIdx.x;
    int cy = blockIdx.y * blockDim.y + threadIdx.y;
    int z = blockIdx.z;
    int cells = size / f;
    if (cx >= cells || cy >= cells) return;
    size_t plane = (size_t)size * size;
    const IN_T* p = src + (size_t)z * 3 * plane;
    float acc = 0.0f;
    for (int dy = 0; dy < f; ++dy) {
        size_t row = (size_t)(cy * f + dy) * size + cx * f;
        for (int dx = 0; dx < f; ++dx) {
            size_t i = row + dx;
            acc += 0.299f * LOAD(p[i]) + 0.587f * LOAD(p[plane + i]) + 0.114f * LOAD(p[2 * plane + i]);
        }
    }
    float val = acc / (float)(f * f) * 255.0f + 0.5f;
    sig[(size_t)z * cells * cells + cy * cells + cx] = (unsigned char)fminf(fmaxf(val, 0.0f), 255.0f);
}
"""


def _cp() -> Any:
    import cupy

    return cupy


def _is_half(dtype: Any) -> bool:
    kind = np.dtype(dtype)
    if kind not in (np.dtype(np.float16), np.dtype(np.float32)):
        raise ValueError(f"model input dtype must be float16 or float32, got {kind}")
    return bool(kind == np.dtype(np.float16))


def geometry(w: int, h: int, size: int) -> tuple[Letterbox, int, int]:
    """The CPU letterbox's mapping of a ``w`` x ``h`` image into ``size``, and its resized (new_w, new_h)."""
    lb = letterbox_params(w, h, size)
    return lb, round(w * lb.scale), round(h * lb.scale)


class LetterboxBatch:
    """One launch letterboxes a batch of device uint8 HWC images into (n, 3, size, size) FP32/FP16 planes."""

    def __init__(self, dtype: Any, max_batch: int) -> None:
        cp = _cp()
        half = _is_half(dtype)
        src = HALF_HELPERS + _LETTERBOX.replace("OUT_T", "unsigned short" if half else "float").replace(
            "STORE", "f2h" if half else "f2f")
        self._kernel = cp.RawModule(code=src).get_function("letterbox")
        self.dtype = np.float16 if half else np.float32
        self.max_batch = max_batch
        # pageable on purpose: an async copy from pageable memory has read it when the call returns, so the
        # next batch may overwrite it at once (a pinned table would need a fence per batch)
        self._table_host = np.zeros((max_batch, TABLE_COLS), np.int64)
        self._table = cp.zeros((max_batch, TABLE_COLS), cp.int64)

    def __call__(self, images: Sequence[Any], size: int, out: Any, stream: Any, bgr: bool = False) -> tuple[
            list[Letterbox], int]:
        """``images``: device arrays (or objects with ``__cuda_array_interface__``) of shape (h, w, 3) uint8;
        ``out``: (>= n, 3, size, size) device array of this kernel's dtype. Returns the letterboxes and the bytes
        of the geometry table uploaded."""
        n = len(images)
        if n == 0:
            return [], 0
        if n > self.max_batch:
            raise ValueError(f"letterbox batch of {n} images exceeds max_batch {self.max_batch}")
        if out.dtype != self.dtype or tuple(out.shape[1:]) != (3, size, size) or out.shape[0] < n:
            raise ValueError(f"out must be (>= {n}, 3, {size}, {size}) {np.dtype(self.dtype)}, got {out.dtype} "
                             f"{tuple(out.shape)}")
        lbs: list[Letterbox] = []
        t = self._table_host
        for i, img in enumerate(images):
            cai = img.__cuda_array_interface__
            h, w, c = (int(d) for d in cai["shape"])
            if c != 3 or cai["typestr"] != "|u1":
                raise ValueError(f"image {i}: expected (h, w, 3) uint8, got {cai['shape']} {cai['typestr']}")
            strides = cai.get("strides")
            pitch = int(strides[0]) if strides else w * 3
            if strides and (int(strides[1]) != 3 or int(strides[2]) != 1):
                raise ValueError(f"image {i}: pixels must be interleaved and contiguous per row, strides {strides}")
            lb, nw, nh = geometry(w, h, size)
            t[i] = (int(cai["data"][0]), h, w, pitch, nh, nw, int(lb.pad_y), int(lb.pad_x), int(bgr), 0)
            lbs.append(lb)
        with stream:
            self._table[:n].set(t[:n], stream=stream)
            grid = ((size + 31) // 32, (size + 7) // 8, n)
            self._kernel(grid, (32, 8), (self._table, out, np.int32(size)))
        return lbs, int(t[:n].nbytes)


class LumaKernel:
    """(n, 3, S, S) RGB in [0, 1] (FP32 or FP16, device) -> (n, S/f, S/f) uint8 luma, f x f cell means."""

    def __init__(self, dtype: Any, factor: int = SIGNATURE_FACTOR) -> None:
        cp = _cp()
        half = _is_half(dtype)
        src = HALF_HELPERS + _LUMA.replace("IN_T", "unsigned short" if half else "float").replace(
            "LOAD", "h2f" if half else "f2f")
        self._kernel = cp.RawModule(code=src).get_function("luma")
        self.dtype = np.float16 if half else np.float32
        self.factor = factor

    def __call__(self, batch: Any, n: int, out: Any, stream: Any) -> None:
        size = int(batch.shape[-1])
        cells = size // self.factor
        if batch.dtype != self.dtype or out.shape[1:] != (cells, cells) or out.shape[0] < n:
            raise ValueError(f"luma: batch {batch.dtype} {tuple(batch.shape)} / out {tuple(out.shape)} do not fit")
        if n == 0:
            return
        with stream:
            self._kernel(((cells + 15) // 16, (cells + 15) // 16, n), (16, 16),
                         (batch, out, np.int32(size), np.int32(self.factor)))


def pinned_array(shape: tuple[int, ...], dtype: Any) -> NDArray[Any]:
    """A numpy array in page-locked host memory (fast, truly asynchronous copies)."""
    count = int(np.prod(shape))
    mem = _cp().cuda.alloc_pinned_memory(max(count * np.dtype(dtype).itemsize, 1))
    return np.frombuffer(mem, dtype, count).reshape(shape)


class PinnedStaging:
    """Page-locked host buffer the JPEG bytes of one batch are packed into, so the decoder's single
    host-to-device copy of the compressed bytes reads pinned memory. One per in-flight batch: it is reused only
    after that batch's device work has finished."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"staging capacity must be >= 1 byte, got {capacity}")
        self.capacity = capacity
        self._buf = pinned_array((capacity,), np.uint8)

    def pack(self, jpegs: Sequence[bytes]) -> list[NDArray[np.uint8]]:
        """Views of the packed bytes, one per JPEG; JPEGs that do not fit come back as plain host arrays."""
        views: list[NDArray[np.uint8]] = []
        off = 0
        for data in jpegs:
            n = len(data)
            if off + n <= self.capacity:
                view = self._buf[off : off + n]
                view[:] = np.frombuffer(data, np.uint8)
                views.append(view)
                off += n
            else:  # a writable copy: decoders may read it in place after this returns
                views.append(np.frombuffer(data, np.uint8).copy())
        return views


@dataclass(slots=True)
class Decoded:
    """What stage 1 produced for a batch: output row r holds ``jpegs[rows[r]]``; ``failed`` lists (index,
    reason) of JPEGs the GPU decoder rejected; ``keepalive`` holds device buffers the stream may still read."""

    letterboxes: list[Letterbox]
    rows: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)
    bytes_h2d: int = 0
    keepalive: list[Any] = field(default_factory=list)
