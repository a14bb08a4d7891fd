"""Stage 2 on the GPU: onnxruntime's CUDA execution provider with IO binding on device pointers.

The input is read in place from stage 1's device array, the output lands in a preallocated device array, and
onnxruntime runs its kernels on the stream we give it (``user_compute_stream``), so the pipeline orders stages
with CUDA events instead of host waits. FP16: the model is converted once with onnxconverter-common (weights,
activations and, by default, the input and output too, so stage 1 writes half the bytes).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.inference.model import LoadedModel

log = logging.getLogger(__name__)

_MAX_BINDINGS = 64
OUTPUT_RING = 8  # outputs of ``infer`` in rotation (the runner holds at most ~4: queue depth 2 + in hand)


def to_fp16(onnx_bytes: bytes, keep_io_types: bool = True) -> bytes:
    """FP16 weights and activations; ``keep_io_types`` keeps FP32 at the model's inputs and outputs."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=keep_io_types)
    return bytes(model.SerializeToString())


CUDA_EP_OPSET = 21  # the newest default-domain opset whose MaxPool onnxruntime-gpu 1.31's CUDA EP registers


def for_cuda_ep(onnx_bytes: bytes) -> bytes:
    """The model at opset 21 when it declares a newer one. Opset 22 only widened ops' types (bfloat16), but
    onnxruntime-gpu 1.31's CUDA EP has no MaxPool kernel for it: Ultralytics' opset-22 exports ran SPPF's three
    MaxPools on the CPU EP, with a device round trip each (H200, 2026-11-28). Unchanged if the conversion fails."""
    import onnx
    from onnx import version_converter

    model = onnx.load_from_string(onnx_bytes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset <= CUDA_EP_OPSET:
        return onnx_bytes
    try:
        return bytes(version_converter.convert_version(model, CUDA_EP_OPSET).SerializeToString())
    except Exception as exc:  # the converter lacks an adapter for some op: run the model as it is
        log.warning("could not convert the model from opset %d to %d for the CUDA EP (%s); some nodes may run on "
                    "the CPU", opset, CUDA_EP_OPSET, exc)
        return onnx_bytes


def _np_dtype(ort_type: str) -> Any:
    if ort_type == "tensor(float16)":
        return np.float16
    if ort_type == "tensor(float)":
        return np.float32
    raise ValueError(f"unsupported model tensor type {ort_type}")


class OrtCudaEngine:
    """``infer_into(x, out, stream)``: device in, device out, no host copies. ``stream``: a cupy Stream that
    onnxruntime computes on (None: onnxruntime's own stream, synchronized before each run)."""

    def __init__(self, model: LoadedModel, max_batch: int, device_id: int = 0, fp16: bool = False,
                 stream: Any = None, fp16_io: bool = True, nhwc: bool = False, algo_search: str = "EXHAUSTIVE",
                 warmup: bool = True) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import cupy
        import onnxruntime as ort

        self.model = model
        self.max_batch = max_batch
        self._device = device_id
        self._stream = stream
        self._cp = cupy
        cuda: dict[str, str] = {"device_id": str(device_id), "cudnn_conv_algo_search": algo_search}
        if stream is not None:
            cuda["user_compute_stream"] = str(int(stream.ptr))
        if nhwc:
            cuda["prefer_nhwc"] = "1"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
        base = for_cuda_ep(model.onnx_bytes)
        onnx_bytes = to_fp16(base, keep_io_types=not fp16_io) if fp16 else base
        try:
            self._session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=providers)
        except Exception as exc:
            if not (fp16 and fp16_io):
                raise
            log.warning("%s with FP16 inputs/outputs failed (%s); keeping FP32 at the model's edges",
                        model.path.name, exc)
            self._session = ort.InferenceSession(to_fp16(base, keep_io_types=True), sess_options=opts,
                                                 providers=providers)
        if "CUDAExecutionProvider" not in self._session.get_providers():
            raise RuntimeError(f"onnxruntime did not enable the CUDA execution provider for {model.path.name}")
        precision = "fp16" if fp16 else "fp32"
        self.name = f"onnxruntime:CUDAExecutionProvider:{precision}{':nhwc' if nhwc else ''}"
        self.input_dtype: Any = _np_dtype(self._session.get_inputs()[0].type)
        self.output_dtype: Any = _np_dtype(self._session.get_outputs()[0].type)
        self._out_tail = tuple(int(d) for d in self._session.get_outputs()[0].shape[1:])
        self._bindings: dict[tuple[int, int, int], Any] = {}
        self._ring: list[Any] | None = None
        self._turn = 0
        if warmup:  # at the one batch size the runner uses on the GPU (RunnerOptions.pad_to_batch)
            t0 = time.perf_counter()
            h, w = model.input_hw
            with cupy.cuda.Device(device_id):  # the calling thread's current device may be another GPU
                x = cupy.zeros((max_batch, 3, h, w), dtype=self.input_dtype)
                self.infer(x)
            log.info("%s: %s ready on GPU %d (batch %d, in %s, out %s), warm-up %.0f ms", self.name,
                     model.path.name, device_id, max_batch, np.dtype(self.input_dtype).name,
                     np.dtype(self.output_dtype).name, (time.perf_counter() - t0) * 1000)

    def output_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self._out_tail)

    def infer_into(self, x: Any, out: Any) -> None:
        """Run on ``x`` (n, 3, H, W) device array of ``input_dtype``, writing ``out`` (n, ...) of
        ``output_dtype``; both contiguous. Returns when the work is done on the engine's stream."""
        n = int(x.shape[0])
        if x.dtype != self.input_dtype or out.dtype != self.output_dtype:
            raise ValueError(f"{self.name}: input {x.dtype} / output {out.dtype}, model wants "
                             f"{np.dtype(self.input_dtype).name} / {np.dtype(self.output_dtype).name}")
        if not (x.flags.c_contiguous and out.flags.c_contiguous) or tuple(out.shape) != self.output_shape(n):
            raise ValueError(f"{self.name}: need contiguous arrays and out {self.output_shape(n)}, got "
                             f"{tuple(out.shape)}")
        key = (int(x.data.ptr), int(out.data.ptr), n)
        io = self._bindings.get(key)
        if io is None:
            if len(self._bindings) >= _MAX_BINDINGS:
                self._bindings.clear()
            io = self._session.io_binding()
            io.bind_input(self.model.input_name, "cuda", self._device, self.input_dtype, tuple(x.shape),
                          int(x.data.ptr))
            io.bind_output(self.model.output_name, "cuda", self._device, self.output_dtype, tuple(out.shape),
                           int(out.data.ptr))
            self._bindings[key] = io
        if self._stream is None:
            self._cp.cuda.get_current_stream().synchronize()  # the producer's writes land before onnxruntime reads
        self._session.run_with_iobinding(io)

    def infer(self, batch: Any) -> Any:
        """Device (n, 3, H, W) -> device raw output (n, ...) as FP32; returns when onnxruntime is done. With a
        ``stream``, ``batch`` must have been written on it or ordered before it (the runner's infer stream waits
        on the pre stage's event); without, the current stream is waited for first. Host arrays are uploaded.
        The output lives in a ring of ``OUTPUT_RING`` buffers: a caller holds at most that many at a time."""
        cp = self._cp
        with cp.cuda.Device(self._device):  # the engine's arrays on its device, whatever the thread's current one
            x = cp.ascontiguousarray(cp.asarray(batch, dtype=self.input_dtype))
            n = int(x.shape[0])
            if self._ring is None:
                self._ring = [cp.empty(self.output_shape(self.max_batch), dtype=self.output_dtype)
                              for _ in range(OUTPUT_RING)]
            out = self._ring[self._turn % OUTPUT_RING][:n] if n <= self.max_batch else \
                cp.empty(self.output_shape(n), dtype=self.output_dtype)
            self._turn += 1
            if self._stream is not None and cp.cuda.get_current_stream() != self._stream:
                cp.cuda.get_current_stream().synchronize()  # x was written on another stream
            self.infer_into(x, out)
            if out.dtype == cp.float32:
                return out
            with self._stream if self._stream is not None else cp.cuda.get_current_stream():
                return out.astype(cp.float32)

    def infer_host(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """The naive way, for baselines: host arrays in, host arrays out."""
        out = self._session.run([self.model.output_name], {self.model.input_name: batch.astype(self.input_dtype)})
        return np.asarray(out[0], dtype=np.float32)

    def close(self) -> None:
        self._bindings.clear()
        self._session = None
