"""One fused CuPy kernel: uint8 BGR HxWx3 (device) -> letterboxed RGB CHW float in [0, 1] (bilinear, gray 114 pad).

Bilinear sampling uses half-pixel centers like cv2.resize(INTER_LINEAR), so the output matches the CPU letterbox
(daemon.decode.letterbox) to rounding. Used where the frame is already on the device as pixels (nvImageCodec
decode, PyAV/NVDEC frames, the "CPU decode + uint8 upload" baseline).
"""

from __future__ import annotations

from typing import Any

from daemon.types import Letterbox

_SRC = r"""
extern "C" __global__ void letterbox(const unsigned char* src, int sh, int sw, float* dst, int size,
                                      int top, int left, int nh, int nw, float sx, float sy) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= size || y >= size) return;
    int plane = size * size;
    int o = y * size + x;
    int ix = x - left, iy = y - top;
    if (ix < 0 || iy < 0 || ix >= nw || iy >= nh) {
        float v = 114.0f / 255.0f;
        dst[o] = v; dst[plane + o] = v; dst[2 * plane + o] = v;
        return;
    }
    float fx = (ix + 0.5f) * sx - 0.5f, fy = (iy + 0.5f) * sy - 0.5f;
    fx = fminf(fmaxf(fx, 0.0f), (float)(sw - 1)); fy = fminf(fmaxf(fy, 0.0f), (float)(sh - 1));
    int x0 = (int)fx, y0 = (int)fy;
    int x1 = min(x0 + 1, sw - 1), y1 = min(y0 + 1, sh - 1);
    float ax = fx - x0, ay = fy - y0;
    for (int c = 0; c < 3; ++c) {
        int sc = 2 - c;  // BGR -> RGB
        float p00 = src[(y0 * sw + x0) * 3 + sc], p01 = src[(y0 * sw + x1) * 3 + sc];
        float p10 = src[(y1 * sw + x0) * 3 + sc], p11 = src[(y1 * sw + x1) * 3 + sc];
        float v = (p00 * (1 - ax) + p01 * ax) * (1 - ay) + (p10 * (1 - ax) + p11 * ax) * ay;
        dst[c * plane + o] = v / 255.0f;
    }
}
"""


class LetterboxKernel:
    def __init__(self) -> None:
        import cupy

        self._cp = cupy
        self._kernel = cupy.RawKernel(_SRC, "letterbox")

    def __call__(self, src: Any, lb: Letterbox, size: int, out: Any) -> None:
        """``src`` (h, w, 3) uint8 device array; ``out`` (3, size, size) float32 device array."""
        cp = self._cp
        h, w = int(src.shape[0]), int(src.shape[1])
        nw, nh = round(w * lb.scale), round(h * lb.scale)
        top, left = int(lb.pad_y), int(lb.pad_x)
        block = (16, 16)
        grid = ((size + 15) // 16, (size + 15) // 16)
        self._kernel(grid, block, (cp.ascontiguousarray(src), cp.int32(h), cp.int32(w), out, cp.int32(size),
                                   cp.int32(top), cp.int32(left), cp.int32(nh), cp.int32(nw),
                                   cp.float32(w / nw), cp.float32(h / nh)))
