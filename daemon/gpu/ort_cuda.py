"""Stage 2 on the GPU: onnxruntime's CUDA execution provider with IO binding on device pointers.

The input is read in place from stage 1's device array; the output lands in a device array; nothing crosses PCIe.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from daemon.inference.model import LoadedModel

log = logging.getLogger(__name__)


def to_fp16(onnx_bytes: bytes) -> bytes:
    """FP16 weights and activations inside, FP32 at the model's inputs and outputs (onnxconverter-common)."""
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load_from_string(onnx_bytes), keep_io_types=True)
    return bytes(model.SerializeToString())


class OrtCudaEngine:
    def __init__(self, model: LoadedModel, max_batch: int, device_id: int = 0, fp16: bool = False) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import cupy
        import onnxruntime as ort

        self.model = model
        self.max_batch = max_batch
        self.name = "onnxruntime:CUDAExecutionProvider"
        self._device = device_id
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        onnx_bytes = to_fp16(model.onnx_bytes) if fp16 else model.onnx_bytes
        self.name += ":fp16" if fp16 else ":fp32"
        self._session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=providers)
        if "CUDAExecutionProvider" not in self._session.get_providers():
            raise RuntimeError("onnxruntime did not enable the CUDA execution provider")
        out = self._session.get_outputs()[0]
        self._out_tail = tuple(int(d) for d in out.shape[1:])
        self._in_dtype = np.float16 if "float16" in self._session.get_inputs()[0].type else np.float32
        self._cp = cupy
        h, w = model.input_hw
        t0 = time.perf_counter()
        self.infer(cupy.zeros((max_batch, 3, h, w), dtype=self._in_dtype))
        log.info("%s: %s ready on GPU %d (batch %d), warm-up %.0f ms", self.name, model.path.name, device_id,
                 max_batch, (time.perf_counter() - t0) * 1000)

    @property
    def input_dtype(self) -> Any:
        return self._in_dtype

    def infer(self, batch: Any) -> Any:
        """Device (n, 3, H, W) -> device raw output (n, ...). Host arrays are accepted (and uploaded)."""
        cp = self._cp
        x = cp.ascontiguousarray(cp.asarray(batch, dtype=self._in_dtype))
        n = int(x.shape[0])
        y = cp.empty((n, *self._out_tail), dtype=cp.float32)
        cp.cuda.get_current_stream().synchronize()  # stage 1's writes are done before onnxruntime's stream reads
        io = self._session.io_binding()
        io.bind_input(self.model.input_name, "cuda", self._device, self._in_dtype, tuple(x.shape), x.data.ptr)
        io.bind_output(self.model.output_name, "cuda", self._device, np.float32, tuple(y.shape), y.data.ptr)
        self._session.run_with_iobinding(io)
        io.synchronize_outputs()
        return y

    def infer_host(self, batch: np.ndarray) -> np.ndarray:
        """The naive way, for baselines: host arrays in, host arrays out."""
        out = self._session.run([self.model.output_name], {self.model.input_name: batch.astype(self._in_dtype)})
        return np.asarray(out[0])

    def close(self) -> None:
        self._session = None
