"""Stage 1 with nvImageCodec (the GPU decoder for Jetson, where DALI ships no wheels; also on x86): batched JPEG
decode on the device (hardware JPEG engine where present, else CUDA nvJPEG), then ONE fused CuPy kernel for the
whole batch: letterbox resize (bilinear) + gray 114 pad + RGB planes + /255 in the engine's dtype.

Same interface as daemon.gpu.dali_decode.DaliDecoder. nvidia-nvimgcodec-tegra-cu12 (Jetson) and -cu12/-cu13
(x86) share the Python API used here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from daemon.gpu.kernels import Decoded, LetterboxBatch, LumaKernel, PinnedStaging

log = logging.getLogger(__name__)

# which of nvImageCodec's decoder backends may run, in order of preference ("auto": the library's own choice)
_BACKENDS: dict[str, tuple[str, ...]] = {
    "auto": (),
    "hw": ("HW_GPU_ONLY", "GPU_ONLY"),  # the hardware JPEG engines (A100/H100/H200, Jetson), CUDA where they can't
    "gpu": ("GPU_ONLY",),  # CUDA kernels only
    "hybrid": ("HYBRID_CPU_GPU", "GPU_ONLY"),  # Huffman on the host, the rest in CUDA
}


class NvImgCodecDecoder:
    """``decode_into(jpegs, out, sig, stream, staging)`` fills ``out[:n]`` (and the luma signatures ``sig[:n]``)
    on ``stream``; nothing is waited for on the host."""

    name = "nvimgcodec"

    def __init__(self, size: int, max_batch: int, device_id: int = 0, dtype: Any = np.float32,
                 cpu_threads: int = 0, backends: str = "auto") -> None:
        import cupy
        from nvidia import nvimgcodec

        self.size = size
        self.max_batch = max_batch
        self.dtype = np.dtype(dtype).type
        self._cp = cupy
        self._nv = nvimgcodec
        # fancy (triangular) chroma upsampling, as libjpeg-turbo does by default: the CPU path's pixels
        kinds = _BACKENDS.get(backends)
        if kinds is None:
            raise ValueError(f"nvImageCodec backends must be one of {sorted(_BACKENDS)}, got {backends!r}")
        more: dict[str, Any] = {}
        if kinds:
            more["backends"] = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, k)) for k in kinds]
        self._dec = nvimgcodec.Decoder(device_id=device_id, max_num_cpu_threads=cpu_threads,
                                       options=":fancy_upsampling=1", **more)
        self.backends = backends
        self._params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB,
                                               allow_any_depth=False, sample_format=nvimgcodec.SampleFormat.I_RGB)
        self._letterbox = LetterboxBatch(self.dtype, max_batch)
        self._luma = LumaKernel(self.dtype)
        self._reuse: dict[int, list[Any]] = {}  # per staging buffer (one per in-flight batch): decoded Images
        log.info("nvImageCodec decoder ready (size %d, batch %d, device %d, %s)", size, max_batch, device_id,
                 np.dtype(self.dtype).name)

    def decode_into(self, jpegs: Sequence[bytes], out: Any, sig: Any | None, stream: Any,
                    staging: PinnedStaging | None = None) -> Decoded:
        if len(jpegs) > self.max_batch:
            raise ValueError(f"nvImageCodec batch of {len(jpegs)} frames exceeds max_batch {self.max_batch}")
        if not jpegs:
            return Decoded([], [])
        views = staging.pack(jpegs) if staging is not None else [np.frombuffer(j, np.uint8) for j in jpegs]
        streams = [self._nv.CodeStream(v) for v in views]
        key = id(staging)
        cached = self._reuse.get(key, []) if staging is not None else []
        if len(cached) >= len(streams):  # reuse the Images' device buffers: no allocation, no free per batch
            images = self._dec.decode(streams, images=cached[: len(streams)], params=self._params,
                                      cuda_stream=stream.ptr)
        else:
            images = self._dec.decode(streams, params=self._params, cuda_stream=stream.ptr)
            if staging is not None and all(img is not None for img in images):
                self._reuse[key] = list(images)
        rows = [i for i, img in enumerate(images) if img is not None]
        failed = [(i, "nvImageCodec could not decode it") for i, img in enumerate(images) if img is None]
        good = [images[i] for i in rows]
        lbs, table_bytes = self._letterbox(good, self.size, out, stream)
        if sig is not None:
            self._luma(out, len(rows), sig, stream)
        return Decoded(lbs, rows, failed, sum(len(j) for j in jpegs) + table_bytes, [good, views, streams])

    def close(self) -> None:
        """Drop the reused decoded Images (they may point into pinned staging that is about to be freed)."""
        self._reuse.clear()

    def decode(self, jpegs: Sequence[bytes]) -> Any:
        """Convenience: a new device array (n, 3, size, size), ready when this returns (tests, tools)."""
        cp = self._cp
        out = cp.empty((len(jpegs), 3, self.size, self.size), self.dtype)
        stream = cp.cuda.get_current_stream()
        done = self.decode_into(jpegs, out, None, stream)
        stream.synchronize()
        if done.failed:
            raise ValueError(f"nvImageCodec rejected frames {[i for i, _ in done.failed]}")
        return out
