"""Stage 3 on the GPU: YOLO box decoding and class-aware NMS in CuPy; only the final boxes go to the host.

``GpuPostprocessor`` (anchors_last layout, every Ultralytics YOLOv8/11 detection export) runs two raw kernels
per batch: one thread per anchor finds the best class and masks rows at or under the row's ``conf``; after a
segmented sort by score, one block per image runs greedy class-aware NMS over its candidates in score order
(exactly daemon.inference.nms: suppressed when IoU > iou, ties by lower index) and appends the kept boxes to a
packed output. The host gets a small header (counts, offsets) and then exactly the kept rows.

Same rules as daemon.inference.yolo: a box passes when its best class score is > conf; at most ``max_det`` per
image leave. Other layouts (anchors_first, end2end) use the CuPy path ``decode_batch`` (Cluster-NMS).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

MAX_CANDIDATES = 30_000  # like daemon.inference.yolo.MAX_NMS
NMS_THREADS = 256
INVALID = -3.0e38

_SRC = r"""
extern "C" __global__ void best_class(const float* pred, int C, int N, const float* conf, float* key, int* cls) {
    int a = blockIdx.x * blockDim.x + threadIdx.x;
    int b = blockIdx.y;
    if (a >= N) return;
    const float* p = pred + (size_t)b * (4 + C) * N + 4 * (size_t)N + a;
    float best = p[0];
    int bc = 0;
    for (int c = 1; c < C; ++c) {
        float v = p[(size_t)c * N];
        if (v > best) { best = v; bc = c; }
    }
    key[(size_t)b * N + a] = best > conf[b] ? -best : 3.0e38f;  /* ascending sort puts the best first */
    cls[(size_t)b * N + a] = bc;
}

extern "C" __global__ void nms(const float* pred, int C, int N, const long long* order, const float* key,
                               const int* cls, const float* iou_thr, int max_det, int max_cand,
                               float* sorted /* B, N, 6 scratch */, float* out /* B * max_det, 6 */,
                               int* header /* 1 + 2B: total, offsets, counts */) {
    extern __shared__ unsigned char keep[];
    __shared__ int k_valid;
    int b = blockIdx.x, tid = threadIdx.x, nt = blockDim.x;
    const long long* ord = order + (size_t)b * N;
    const float* kb = key + (size_t)b * N;
    const float* pb = pred + (size_t)b * (4 + C) * N;
    float* s = sorted + (size_t)b * N * 6;
    if (tid == 0) k_valid = 0;
    __syncthreads();
    int local = 0;
    for (int j = tid; j < N; j += nt) if (kb[ord[j]] < 1.0e38f) local++;
    atomicAdd(&k_valid, local);
    __syncthreads();
    int k = min(k_valid, max_cand);
    for (int j = tid; j < k; j += nt) {
        long long a = ord[j];
        float cx = pb[a], cy = pb[N + a], w = pb[2 * (size_t)N + a], h = pb[3 * (size_t)N + a];
        float hw = w / 2.0f, hh = h / 2.0f;
        s[j * 6 + 0] = cx - hw; s[j * 6 + 1] = cy - hh; s[j * 6 + 2] = cx + hw; s[j * 6 + 3] = cy + hh;
        s[j * 6 + 4] = -kb[a]; s[j * 6 + 5] = (float)cls[(size_t)b * N + a];
        keep[j] = 1;
    }
    __syncthreads();
    double thr = (double)iou_thr[b];
    for (int i = 0; i < k; ++i) {
        if (!keep[i]) continue;  /* uniform: keep[i] was settled before the last barrier */
        double x1 = s[i * 6], y1 = s[i * 6 + 1], x2 = s[i * 6 + 2], y2 = s[i * 6 + 3];
        /* a NaN/inf corner (corrupt output) neither suppresses nor is suppressed, as on the CPU (fmax would
           drop a NaN where numpy's maximum keeps it) */
        if (!(isfinite(x1) && isfinite(y1) && isfinite(x2) && isfinite(y2))) continue;
        float ci = s[i * 6 + 5];
        double ai = fmax(x2 - x1, 0.0) * fmax(y2 - y1, 0.0);
        for (int j = i + 1 + tid; j < k; j += nt) {
            if (!keep[j] || s[j * 6 + 5] != ci) continue;
            double u1 = s[j * 6], v1 = s[j * 6 + 1], u2 = s[j * 6 + 2], v2 = s[j * 6 + 3];
            if (!(isfinite(u1) && isfinite(v1) && isfinite(u2) && isfinite(v2))) continue;
            double iw = fmax(fmin(x2, u2) - fmax(x1, u1), 0.0), ih = fmax(fmin(y2, v2) - fmax(y1, v1), 0.0);
            double inter = iw * ih;
            double uni = ai + fmax(u2 - u1, 0.0) * fmax(v2 - v1, 0.0) - inter;
            if (uni > 0.0 && inter / uni > thr) keep[j] = 0;
        }
        __syncthreads();
    }
    if (tid == 0) {
        int n = 0;
        for (int j = 0; j < k && n < max_det; ++j) n += keep[j];
        int base = atomicAdd(&header[0], n);
        header[1 + b] = base;
        header[1 + gridDim.x + b] = n;
        int r = 0;
        for (int j = 0; j < k && r < n; ++j) {
            if (!keep[j]) continue;
            for (int c = 0; c < 6; ++c) out[(size_t)(base + r) * 6 + c] = s[j * 6 + c];
            ++r;
        }
    }
}
"""


def _cp() -> Any:
    import cupy

    return cupy


class GpuPostprocessor:
    """Box decoding + NMS for batches of one model on one stream; buffers grow once and are reused.

    ``pinned``: the host side of the two device-to-host copies lives in page-locked memory (true async copies).
    ``bytes_d2h`` counts every byte copied to the host; ``bytes_h2d`` the thresholds uploaded (when they change).
    """

    def __init__(self, max_det: int = 300, pinned: bool = True) -> None:
        if max_det < 1:
            raise ValueError(f"max_det must be >= 1, got {max_det}")
        cp = _cp()
        self._cp = cp
        module = cp.RawModule(code=_SRC)
        self._best = module.get_function("best_class")
        self._nms = module.get_function("nms")
        self.max_det = max_det
        self._pinned = pinned
        self._shape: tuple[int, int, int] = (0, 0, 0)
        self._thr_key: tuple[bytes, bytes] = (b"", b"")
        self.bytes_d2h = 0
        self.bytes_h2d = 0

    def _ensure(self, b: int, rows: int, n: int) -> None:
        if self._shape[0] >= b and self._shape[1:] == (rows, n):
            return
        cp = self._cp
        self._shape = (b, rows, n)
        self._key = cp.empty((b, n), cp.float32)
        self._cls = cp.empty((b, n), cp.int32)
        self._sorted = cp.empty((b, n, 6), cp.float32)
        self._out = cp.empty((b * self.max_det, 6), cp.float32)
        self._header = cp.empty(1 + 2 * b, cp.int32)
        self._conf = cp.empty(b, cp.float32)
        self._iou = cp.empty(b, cp.float32)
        self._thr_key = (b"", b"")
        self._host_header = self._host((1 + 2 * b,), np.int32)
        self._host_out = self._host((b * self.max_det, 6), np.float32)

    def _host(self, shape: tuple[int, ...], dtype: Any) -> NDArray[Any]:
        count = int(np.prod(shape))
        if not self._pinned:
            return np.empty(shape, dtype)
        mem = self._cp.cuda.alloc_pinned_memory(count * np.dtype(dtype).itemsize)
        return np.frombuffer(mem, dtype, count).reshape(shape)

    def __call__(self, raw: Any, conf: NDArray[np.float32], iou: NDArray[np.float32],
                 stream: Any = None) -> list[NDArray[np.float32]]:
        """``raw`` (B, 4+C, N) device output; per-row ``conf``/``iou`` -> per row an (n, 6) host array
        x1, y1, x2, y2, score, class (model-input pixels, best first). Runs on ``stream`` (else the current one)
        and waits for it at the end."""
        cp = self._cp
        if raw.ndim != 3 or raw.shape[1] < 5:
            raise ValueError(f"GpuPostprocessor: raw output must be (B, 4+C, N), got {tuple(raw.shape)}")
        b, rows, n = (int(d) for d in raw.shape)
        if len(conf) < b or len(iou) < b:
            raise ValueError(f"GpuPostprocessor: {b} rows but {len(conf)} conf / {len(iou)} iou values")
        stream = stream if stream is not None else cp.cuda.get_current_stream()
        with stream:
            return self._run(raw, b, rows, n, conf, iou, stream)

    def _run(self, raw: Any, b: int, rows: int, n: int, conf: NDArray[np.float32], iou: NDArray[np.float32],
             stream: Any) -> list[NDArray[np.float32]]:
        cp = self._cp
        self._ensure(b, rows, n)
        pred = cp.ascontiguousarray(raw if raw.dtype == cp.float32 else raw.astype(cp.float32))
        c32 = np.ascontiguousarray(conf[:b], np.float32)
        i32 = np.ascontiguousarray(iou[:b], np.float32)
        key = (c32.tobytes(), i32.tobytes())
        if key != self._thr_key:
            self._conf[:b].set(c32, stream=stream)
            self._iou[:b].set(i32, stream=stream)
            self.bytes_h2d += c32.nbytes + i32.nbytes
            self._thr_key = key
        classes = rows - 4
        self._best(((n + 255) // 256, b), (256,), (pred, np.int32(classes), np.int32(n), self._conf, self._key,
                                                     self._cls))
        order = cp.argsort(self._key[:b], axis=1)
        self._header.fill(0)
        max_cand = min(n, MAX_CANDIDATES)
        self._nms((b,), (NMS_THREADS,), (pred, np.int32(classes), np.int32(n), order, self._key, self._cls,
                                          self._iou, np.int32(self.max_det), np.int32(max_cand), self._sorted,
                                          self._out, self._header), shared_mem=max_cand)
        header = self._host_header[: 1 + 2 * b]
        self._header[: 1 + 2 * b].get(stream=stream, out=header)
        stream.synchronize()
        total = int(header[0])
        self.bytes_d2h += header.nbytes
        host = self._host_out[:total]
        if total:
            self._out[:total].get(stream=stream, out=host)
            stream.synchronize()
            self.bytes_d2h += host.nbytes
        offsets, counts = header[1 : 1 + b], header[1 + b : 1 + 2 * b]
        return [host[int(o) : int(o) + int(c)].copy() for o, c in zip(offsets, counts, strict=True)]


# ------------------------------------------------------------------------------------------------ CuPy path
def candidates(pred: Any, layout: str, conf: float) -> tuple[Any, Any, Any]:
    """Boxes (xyxy), best scores and class ids (device arrays) of one image's rows scoring above ``conf``."""
    cp = _cp()
    if layout == "anchors_last":
        scores_all = pred[4:]
        best = scores_all.max(axis=0)
        sel = cp.flatnonzero(best > conf)
        cls = scores_all[:, sel].argmax(axis=0).astype(cp.float32)
        xywh = pred[:4, sel].T
        scores = best[sel]
    elif layout == "anchors_first":
        rows = pred[pred[:, 4] > conf]
        class_scores = rows[:, 5:] * rows[:, 4:5]
        best = class_scores.max(axis=1) if rows.shape[0] else cp.zeros(0, cp.float32)
        keep = best > conf
        cls = class_scores[keep].argmax(axis=1).astype(cp.float32)
        xywh = rows[keep, :4]
        scores = best[keep]
    elif layout == "end2end":
        rows = pred[pred[:, 4] > conf]
        return rows[:, :4], rows[:, 4], rows[:, 5]
    else:
        raise ValueError(f"unknown layout {layout!r}")
    half = xywh[:, 2:4] / 2
    boxes = cp.concatenate([xywh[:, :2] - half, xywh[:, :2] + half], axis=1)
    return boxes, scores, cls


def cluster_nms(boxes: Any, scores: Any, classes: Any, iou: float) -> Any:
    """Indices (device) of the boxes greedy class-aware NMS keeps, best first (Cluster-NMS: the upper-triangle
    IoU matrix is reduced with the current keep mask until it no longer changes, which equals greedy NMS)."""
    cp = _cp()
    n = int(scores.shape[0])
    if n == 0:
        return cp.zeros(0, cp.int64)
    order = cp.argsort(-scores)[:MAX_CANDIDATES]
    b = boxes[order].astype(cp.float64)
    # the span from finite corners only: a NaN/inf corner (corrupt output) must not poison every class's offset
    span = float(cp.abs(cp.where(cp.isfinite(b), b, 0.0)).max()) * 2.0 + 1.0
    b = b + classes[order].astype(cp.float64)[:, None] * span
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    area = cp.maximum(x2 - x1, 0) * cp.maximum(y2 - y1, 0)
    w = cp.maximum(cp.minimum(x2[:, None], x2[None, :]) - cp.maximum(x1[:, None], x1[None, :]), 0)
    h = cp.maximum(cp.minimum(y2[:, None], y2[None, :]) - cp.maximum(y1[:, None], y1[None, :]), 0)
    inter = w * h
    union = area[:, None] + area[None, :] - inter
    ious = cp.triu(cp.where(union > 0, inter / cp.where(union > 0, union, 1), 0), k=1)  # [i, j]: i above j
    keep = cp.ones(ious.shape[0], dtype=cp.bool_)
    for _ in range(ious.shape[0]):
        new_keep = ~((ious * keep[:, None]).max(axis=0) > iou)
        if bool((new_keep == keep).all()):
            break
        keep = new_keep
    return order[cp.flatnonzero(keep)]


def decode_batch(raw: Any, layout: str, conf: float, iou: float, max_det: int,
                 classes: frozenset[int] | None = None) -> list[NDArray[np.float32]]:
    """Per image an (N, 6) host array x1, y1, x2, y2, score, class in model pixels: only these leave the GPU."""
    cp = _cp()
    out: list[NDArray[np.float32]] = []
    wanted = None if classes is None else cp.asarray(sorted(classes), dtype=cp.float32)
    for i in range(raw.shape[0]):
        boxes, scores, cls = candidates(raw[i].astype(cp.float32, copy=False), layout, conf)
        if wanted is not None and scores.shape[0]:
            sel = cp.isin(cls, wanted)
            boxes, scores, cls = boxes[sel], scores[sel], cls[sel]
        keep = cp.argsort(-scores)[:max_det] if layout == "end2end" else cluster_nms(boxes, scores, cls, iou)[:max_det]
        det = cp.concatenate([boxes[keep], scores[keep, None], cls[keep, None]], axis=1).astype(cp.float32)
        out.append(cp.asnumpy(det))
    return out


def decode_rows(raw: Any, layout: str, conf: NDArray[np.float32], iou: NDArray[np.float32],
                max_det: int = 300, post: GpuPostprocessor | None = None) -> list[NDArray[np.float32]]:
    """All rows of a batch at once, per-row thresholds; anchors_last goes through ``post`` (a
    GpuPostprocessor; pass one to reuse its buffers), other layouts through ``decode_batch`` row by row."""
    b = int(raw.shape[0])
    if layout != "anchors_last":
        return [decode_batch(raw[i : i + 1], layout, float(conf[i]), float(iou[i]), max_det)[0] for i in range(b)]
    if post is None or post.max_det != max_det:
        post = GpuPostprocessor(max_det, pinned=False)
    return post(raw, conf, iou)
