"""Stage 1 on the GPU with DALI: JPEG bytes (packed in pinned host memory) -> one host-to-device copy of the
compressed bytes -> nvJPEG decode (hardware JPEG engine where present) -> letterbox exactly like the CPU path ->
RGB CHW /255 in the engine's dtype (FP32 or FP16), plus a 1/8 luma signature per frame, all on the device.

The letterbox geometry is not left to DALI's own rounding: each frame's resized size and padding come from
daemon.decode.letterbox (Ultralytics' arithmetic) and are fed per sample (resize_x/resize_y, then a padded
slice anchored at (-top, -left) with gray 114), so boxes map back exactly as on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.decode.jpeg import jpeg_size
from daemon.gpu.kernels import SIGNATURE_FACTOR, Decoded, LumaKernel, PinnedStaging, geometry

log = logging.getLogger(__name__)

PAD = 114


class DaliDecoder:
    """``decode_into(jpegs, out, sig, stream, staging)`` fills ``out[:n]`` and ``sig[:n]`` on ``stream``."""

    name = "dali"

    def __init__(self, size: int, max_batch: int, device_id: int = 0, fp16: bool = False, threads: int = 4,
                 dtype: Any = None, hw_decoder_load: float = 0.65) -> None:
        import cupy
        from nvidia.dali import fn, pipeline_def, types

        self.size = size
        self.max_batch = max_batch
        self.dtype = np.dtype(dtype if dtype is not None else np.float16 if fp16 else np.float32).type
        self.fp16 = self.dtype is np.float16
        self._cp = cupy
        out_type = types.FLOAT16 if self.fp16 else types.FLOAT

        @pipeline_def(  # type: ignore[untyped-decorator]
            batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def letterbox_pipe() -> Any:
            jpegs = fn.external_source(name="jpegs", device="cpu", dtype=types.UINT8, ndim=1, no_copy=True)
            rx = fn.external_source(name="rx", device="cpu", dtype=types.FLOAT, ndim=0)
            ry = fn.external_source(name="ry", device="cpu", dtype=types.FLOAT, ndim=0)
            start = fn.external_source(name="start", device="cpu", dtype=types.INT32, ndim=1)
            imgs = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, adjust_orientation=False,
                                     hw_decoder_load=hw_decoder_load)
            imgs = fn.resize(imgs, resize_x=rx, resize_y=ry, interp_type=types.INTERP_LINEAR, antialias=False)
            imgs = fn.slice(imgs, start=start, shape=[size, size], axis_names="HW", out_of_bounds_policy="pad",
                            fill_values=PAD)
            return fn.crop_mirror_normalize(imgs, mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                                            output_layout="CHW", dtype=out_type)

        self._pipe = letterbox_pipe()
        self._pipe.build()
        self._luma = LumaKernel(self.dtype)
        log.info("DALI letterbox pipeline built (size %d, batch %d, device %d, %s)", size, max_batch, device_id,
                 np.dtype(self.dtype).name)

    def decode_into(self, jpegs: Sequence[bytes], out: Any, sig: Any | None, stream: Any,
                    staging: PinnedStaging | None = None) -> Decoded:
        """Raises on a batch DALI cannot decode (one bad frame fails the whole batch: callers retry one by one);
        ``jpeg_size`` errors (DecodeError) name the frame."""
        n = len(jpegs)
        if n > self.max_batch:
            raise ValueError(f"DALI batch of {n} frames exceeds max_batch {self.max_batch}")
        if n == 0:
            return Decoded([], [])
        lbs, rx, ry, start = [], [], [], []
        for data in jpegs:
            w, h = jpeg_size(data)
            lb, nw, nh = geometry(w, h, self.size)
            lbs.append(lb)
            rx.append(np.float32(nw))
            ry.append(np.float32(nh))
            start.append(np.array([-int(lb.pad_y), -int(lb.pad_x)], np.int32))
        # no_copy: DALI reads these arrays in place, so they must be writable and outlive the batch (keepalive)
        views = staging.pack(jpegs) if staging is not None else [np.frombuffer(j, np.uint8).copy() for j in jpegs]
        (result,) = self._pipe.run(stream, jpegs=views, rx=rx, ry=ry, start=start)
        shapes = [tuple(int(d) for d in shape) for shape in result.shape()]
        if len(shapes) != n or any(shape != (3, self.size, self.size) for shape in shapes):
            raise RuntimeError(f"DALI produced {shapes[:2]}... for {n} frames, expected (3, {self.size}, {self.size})")
        # one device-to-device copy into the caller's slot, ordered on ``stream`` (works for non-contiguous lists)
        result.copy_to_external(ctypes.c_void_p(int(out.data.ptr)), ctypes.c_void_p(int(stream.ptr)),
                                non_blocking=True)
        if sig is not None:
            self._luma(out, n, sig, stream)
        return Decoded(lbs, list(range(n)), [], sum(len(j) for j in jpegs), [result, views])

    def decode(self, jpegs: Sequence[bytes]) -> Any:
        """A new device array (n, 3, size, size), ready when this returns (tests, tools, the staged runner)."""
        cp = self._cp
        out = cp.empty((len(jpegs), 3, self.size, self.size), self.dtype)
        stream = cp.cuda.get_current_stream()
        self.decode_into(jpegs, out, None, stream)
        stream.synchronize()
        return out


def luma_signatures(batch: Any, factor: int = SIGNATURE_FACTOR) -> Any:
    """(n, 3, S, S) RGB in [0, 1] -> (n, S/f, S/f) uint8 luma, averaged over f x f cells, on the device."""
    import cupy

    n, _, s, _ = batch.shape
    out = cupy.empty((n, s // factor, s // factor), cupy.uint8)
    LumaKernel(batch.dtype, factor)(cupy.ascontiguousarray(batch), n, out, cupy.cuda.get_current_stream())
    return out
