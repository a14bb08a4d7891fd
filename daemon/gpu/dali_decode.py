"""Stage 1 on the GPU with DALI: JPEG bytes -> one H2D copy of the compressed bytes -> nvJPEG decode (hardware
engine where present) -> letterbox (aspect kept, gray 114, centered) -> RGB CHW /255 in the engine's dtype, plus a
1/8 luma signature per frame for delta caching. Matches daemon.decode.letterbox (Ultralytics' letterbox)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

PAD = 114.0


class DaliDecoder:
    """A DALI pipeline fed with encoded JPEG bytes; ``decode`` returns a device array (n, 3, S, S)."""

    def __init__(self, size: int, max_batch: int, device_id: int = 0, fp16: bool = False, threads: int = 4) -> None:
        from nvidia.dali import fn, pipeline_def, types

        self.size = size
        self.max_batch = max_batch
        self.fp16 = fp16
        self.dtype = np.float16 if fp16 else np.float32

        @pipeline_def(  # type: ignore[untyped-decorator]
            batch_size=max_batch, num_threads=threads, device_id=device_id, prefetch_queue_depth=1
        )
        def letterbox_pipe() -> Any:
            jpegs = fn.external_source(name="jpegs", device="cpu", dtype=types.UINT8, ndim=1)
            imgs = fn.decoders.image(jpegs, device="mixed", output_type=types.RGB, hybrid_huffman_threshold=0)
            imgs = fn.resize(imgs, size=[size, size], mode="not_larger", interp_type=types.INTERP_LINEAR,
                             antialias=False)
            return fn.crop_mirror_normalize(
                imgs, crop=(size, size), crop_pos_x=0.5, crop_pos_y=0.5, out_of_bounds_policy="pad",
                mean=[0.0, 0.0, 0.0], std=[255.0, 255.0, 255.0],
                fill_values=[PAD / 255.0] * 3,  # in output units: the pad is filled after normalization
                output_layout="CHW", dtype=types.FLOAT16 if fp16 else types.FLOAT,
            )

        self._pipe = letterbox_pipe()
        self._pipe.build()
        log.info("DALI letterbox pipeline built (size %d, batch %d, device %d, %s)", size, max_batch, device_id,
                 "fp16" if fp16 else "fp32")

    def decode(self, jpegs: Sequence[bytes]) -> Any:
        """Device array (n, 3, size, size); raises on a batch DALI cannot decode (callers retry one by one)."""
        import cupy

        if not jpegs or len(jpegs) > self.max_batch:
            raise ValueError(f"DALI batch of {len(jpegs)} frames (1..{self.max_batch})")
        self._pipe.feed_input("jpegs", [np.frombuffer(j, dtype=np.uint8) for j in jpegs])
        (out,) = self._pipe.run()
        tensor = out.as_tensor()
        arr = cupy.asarray(tensor)  # __cuda_array_interface__: a view of DALI's buffer
        result = arr.copy()  # ours from here on: DALI reuses its buffer on the next run
        cupy.cuda.get_current_stream().synchronize()
        return result


def luma_signatures(batch: Any, factor: int = 8) -> Any:
    """(n, 3, S, S) RGB in [0, 1] -> (n, S/f, S/f) uint8 luma, averaged over f x f cells, on the device."""
    import cupy

    n, _, s, _ = batch.shape
    y = 0.299 * batch[:, 0] + 0.587 * batch[:, 1] + 0.114 * batch[:, 2]
    cells = y.astype(cupy.float32).reshape(n, s // factor, factor, s // factor, factor).mean(axis=(2, 4))
    return cupy.clip(cells * 255.0 + 0.5, 0, 255).astype(cupy.uint8)
