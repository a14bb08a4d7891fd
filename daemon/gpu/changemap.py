"""Delta caching's change maps on the GPU: a whole batch of luma signatures against each camera's reference
signature, on the device, reading only the signatures (1/64 of the luma). What comes to the host is the tile
scores and the brightness shift per frame (400 bytes a frame at tile 32), not the signatures.

Same arithmetic as daemon.delta.changemap.tile_scores (the CPU path): per frame the median of (sig - ref) is the
global brightness shift, and each tile's score is the mean of |sig - ref - shift| over its cells. The per-camera
noise floor and the decisions stay on the host (daemon.delta.tracker), which takes these scores instead of
computing them. The references live on the device and follow the tracker's rule: a FULL frame replaces its
camera's reference, a REGIONS frame copies its regions' cells into it (one kernel per batch for all of them).

``device_s`` is the device time of this work (CUDA events around the uploads of the small index tables and the
kernels), not the host's wall time around it: that includes waiting for the stream and, with the runner's other
stage threads busy, for the GIL after the wait (up to a switch interval, 5 ms), which is not the change map's
cost. The index tables go up from pinned host buffers (no allocation, no pageable copy per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.delta.policy import Decision, Verdict

_UPDATE = r"""
extern "C" __global__ void update(const unsigned char* sigs, unsigned char* refs, const int* rects, int n, int cells) {
    // rects: n x (sig row, ref slot, y1, y2, x1, x2) in signature cells; one block row per rect
    int k = blockIdx.y;
    if (k >= n) return;
    const int* r = rects + 6 * k;
    int h = r[3] - r[2], w = r[5] - r[4];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < h * w; i += gridDim.x * blockDim.x) {
        int y = r[2] + i / w, x = r[4] + i % w;
        refs[(size_t)r[1] * cells * cells + y * cells + x] = sigs[(size_t)r[0] * cells * cells + y * cells + x];
    }
}
"""


_SCORES = r"""
extern "C" __global__ void scores(const unsigned char* sigs, const unsigned char* refs, const int* pairs,
                                  int cells, int cpt, float* out) {
    // one block per frame: pairs[2k] = its signature row, pairs[2k+1] = its camera's reference slot;
    // out[k] = (brightness shift, tile scores row-major), the arithmetic of daemon.delta.changemap.tile_scores
    __shared__ int hist[511];
    __shared__ float shift_s;
    int k = blockIdx.x, n = cells * cells, t = cells / cpt;
    const unsigned char* s = sigs + (size_t)pairs[2 * k] * n;
    const unsigned char* r = refs + (size_t)pairs[2 * k + 1] * n;
    float* o = out + (size_t)k * (1 + t * t);
    for (int i = threadIdx.x; i < 511; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) atomicAdd(&hist[(int)s[i] - (int)r[i] + 255], 1);
    __syncthreads();
    if (threadIdx.x == 0) {  // the median: the mean of the two middle values (one value when n is odd)
        int lo = (n - 1) / 2, hi = n / 2, below = 0, vlo = 0, vhi = 0, found = 0;
        for (int b = 0; b < 511; ++b) {
            int upto = below + hist[b];
            if (!found && lo < upto) { vlo = b - 255; found = 1; }
            if (hi < upto) { vhi = b - 255; break; }
            below = upto;
        }
        shift_s = 0.5f * (float)(vlo + vhi);
        o[0] = shift_s;
    }
    __syncthreads();
    float shift = shift_s;
    for (int j = threadIdx.x; j < t * t; j += blockDim.x) {
        int ty = j / t, tx = j % t;
        float acc = 0.0f;
        for (int dy = 0; dy < cpt; ++dy) {
            for (int dx = 0; dx < cpt; ++dx) {
                int i = (ty * cpt + dy) * cells + tx * cpt + dx;
                acc += fabsf((float)((int)s[i] - (int)r[i]) - shift);
            }
        }
        o[1 + j] = acc / (float)(cpt * cpt);
    }
}
"""


class GpuChangeMaps:
    """Per-camera device references and a batched scorer."""

    def __init__(self, cells: int, factor: int, capacity: int = 64) -> None:
        import cupy

        self._cp = cupy
        self.cells = cells
        self.factor = factor
        self._slots: dict[str, int] = {}
        self._refs = cupy.zeros((capacity, cells, cells), cupy.uint8)
        self._update = cupy.RawModule(code=_UPDATE).get_function("update")
        self._scores = cupy.RawModule(code=_SCORES).get_function("scores")
        self.device_s = 0.0  # device time of the scores and update work so far (events; see the module doc)
        self._timed: list[tuple[Any, Any]] = []  # (start, end) events not yet added to device_s
        self._tables: dict[str, tuple[NDArray[np.int32], Any]] = {}  # name -> (pinned host, device) int32 buffers
        self._synced = True  # the stream was synchronized since the "follow" table was last copied up

    def _upload(self, name: str, values: NDArray[np.int32], stream: Any) -> Any:
        """``values`` (flat int32) on the device via ``name``'s pinned buffer, issued on ``stream`` (current)."""
        cp = self._cp
        n = int(values.size)
        host, dev = self._tables.get(name, (np.zeros(0, np.int32), None))
        if host.size < n:
            size = max(256, 2 * n)
            mem = cp.cuda.alloc_pinned_memory(size * 4)
            host, dev = np.frombuffer(mem, np.int32, size), cp.empty(size, cp.int32)
            self._tables[name] = (host, dev)
        host[:n] = values
        dev[:n].set(host[:n], stream=stream)
        return dev[:n]

    def _start(self, stream: Any) -> Any:
        ev = self._cp.cuda.Event()
        ev.record(stream)
        return ev

    def _stop(self, start: Any, stream: Any) -> None:
        end = self._cp.cuda.Event()
        end.record(stream)
        self._timed.append((start, end))

    def _harvest(self) -> None:
        """Adds the timed spans to ``device_s``; call after the stream they were recorded on was synchronized."""
        get = self._cp.cuda.get_elapsed_time
        for start, end in self._timed:
            self.device_s += get(start, end) / 1e3
        self._timed.clear()

    def has(self, camera: str) -> bool:
        return camera in self._slots

    def forget(self, camera: str) -> None:
        """Frees the camera's slot (a later camera reuses it)."""
        self._slots.pop(camera, None)

    def nbytes(self) -> int:
        return len(self._slots) * self.cells * self.cells

    def _slot(self, camera: str) -> int:
        slot = self._slots.get(camera)
        if slot is None:
            used = set(self._slots.values())
            slot = next(i for i in range(len(self._slots) + 1) if i not in used)
            if slot >= int(self._refs.shape[0]):
                grown = self._cp.zeros((2 * int(self._refs.shape[0]), self.cells, self.cells), self._cp.uint8)
                grown[: self._refs.shape[0]] = self._refs
                self._refs = grown
            self._slots[camera] = slot
        return slot

    def upload(self, camera: str, ref: NDArray[np.uint8]) -> None:
        """The host's reference of ``camera`` becomes its device reference (first frames, imported states)."""
        slot = self._slot(camera)
        self._refs[slot] = self._cp.asarray(ref)

    def scores(self, sigs: Any, rows: Sequence[int], cameras: Sequence[str], cells_per_tile: Sequence[int],
               stream: Any) -> list[tuple[NDArray[np.float32], float]]:
        """Per listed row (its camera must have a reference): (tile scores, brightness shift), computed on
        ``stream`` for all rows of one tile size at once (one kernel, one block per frame: a histogram median for the
        shift, then the tile means); one device-to-host copy of the scores per tile size."""
        cp = self._cp
        out: list[tuple[NDArray[np.float32], float] | None] = [None] * len(rows)
        for cpt in sorted(set(cells_per_tile)):
            idx = [i for i, c in enumerate(cells_per_tile) if c == cpt]
            t = self.cells // cpt
            pairs = np.asarray([(rows[i], self._slots[cameras[i]]) for i in idx], np.int32).reshape(-1)
            with stream:
                start = self._start(stream)
                table = self._upload("scores", pairs, stream)
                res = cp.empty((len(idx), 1 + t * t), cp.float32)
                self._launch_scores(sigs, table, len(idx), cpt, res)
                self._stop(start, stream)
                host = cp.asnumpy(res, stream=stream)
            stream.synchronize()
            self._synced = True
            self._harvest()
            for k, i in enumerate(idx):
                out[i] = (host[k, 1:].reshape(t, t).copy(), float(host[k, 0]))
        return [o for o in out if o is not None]

    def _launch_scores(self, sigs: Any, table: Any, n: int, cpt: int, res: Any) -> None:
        self._scores((n,), (256,), (sigs, self._refs, table, np.int32(self.cells), np.int32(cpt), res))

    def device_cost(self, sigs: Any, rows: Sequence[int], cameras: Sequence[str], cpt: int,
                    repeats: int = 200) -> float:
        """Device seconds per frame of the change-map work of one round (these rows, one tile size): the index
        table's upload, the scores kernel and the scores' copy to pinned host memory, ``repeats`` times in one
        CUDA graph, timed by events around the graph's launch. Unlike ``device_s`` this holds no host gaps: the
        graph runs the copies and kernels back to back, as a device that is never left waiting for the host
        would. Call with the runtime idle (it uses a stream of its own)."""
        cp = self._cp
        if not rows:
            raise ValueError("device_cost: no rows")
        t = self.cells // cpt
        pairs = np.asarray([(r, self._slots[c]) for r, c in zip(rows, cameras, strict=True)], np.int32).reshape(-1)
        pinned_pairs = cp.cuda.alloc_pinned_memory(pairs.nbytes)
        host_pairs = np.frombuffer(pinned_pairs, np.int32, pairs.size)
        host_pairs[:] = pairs
        table = cp.empty(pairs.size, cp.int32)
        res = cp.empty((len(rows), 1 + t * t), cp.float32)
        pinned_res = cp.cuda.alloc_pinned_memory(res.nbytes)
        host_res = np.frombuffer(pinned_res, np.float32, res.size).reshape(res.shape)
        stream = cp.cuda.Stream(non_blocking=True)
        rt = cp.cuda.runtime

        def issue() -> None:  # raw async copies: CuPy's set/get refuse host transfers on a capturing stream
            rt.memcpyAsync(table.data.ptr, pinned_pairs.ptr, pairs.nbytes, rt.memcpyHostToDevice, stream.ptr)
            self._launch_scores(sigs, table, len(rows), cpt, res)
            rt.memcpyAsync(pinned_res.ptr, res.data.ptr, res.nbytes, rt.memcpyDeviceToHost, stream.ptr)

        with stream:
            issue()  # compiled and warm before the capture
            stream.synchronize()
            first = host_res.copy()
            host_res[:] = np.nan
            stream.begin_capture()
            for _ in range(repeats):
                issue()
            graph = stream.end_capture()
            graph.launch(stream)
            stream.synchronize()
            start, end = cp.cuda.Event(), cp.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
        if not np.array_equal(first, host_res):  # the graph must have done the very work it is timed for
            raise RuntimeError("device_cost: the captured change maps differ from the direct ones")
        return float(cp.cuda.get_elapsed_time(start, end)) / 1e3 / repeats / len(rows)

    def follow(self, sigs: Any, rows: Sequence[int], cameras: Sequence[str], verdicts: Sequence[Verdict],
               stream: Any) -> None:
        """Update the references as the tracker did for these frames (FULL: the whole signature; REGIONS: the
        regions' cells; SKIP: nothing), in one kernel launch. The cameras must have a device reference."""
        f, c = self.factor, self.cells
        rects: list[tuple[int, int, int, int, int, int]] = []
        for row, cam, v in zip(rows, cameras, verdicts, strict=True):
            slot = self._slot(cam)
            if v.decision is Decision.FULL:
                rects.append((row, slot, 0, c, 0, c))
            elif v.decision is Decision.REGIONS:
                rects.extend((row, slot, r.y1 // f, min(c, r.y2 // f), r.x1 // f, min(c, r.x2 // f))
                             for r in v.regions if r.y2 // f > r.y1 // f and r.x2 // f > r.x1 // f)
        if not rects:
            return
        cp = self._cp
        flat = np.asarray(rects, np.int32).reshape(-1)
        with stream:
            start = self._start(stream)
            # the pinned "follow" table is rewritten only once its last copy is done (a scores() call synchronized
            # the stream since; it always does between two rounds' follows): else a pageable copy
            table = self._upload("follow", flat, stream) if self._synced else cp.asarray(flat)
            self._synced = False
            self._update((8, len(rects)), (256,), (sigs, self._refs, table, np.int32(len(rects)), np.int32(c)))
            self._stop(start, stream)
