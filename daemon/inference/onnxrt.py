"""onnxruntime engine (CPU by default); onnxruntime is imported lazily, with telemetry off."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.inference.model import LoadedModel

log = logging.getLogger(__name__)


def import_onnxruntime() -> ModuleType:
    """Import onnxruntime with ``ORT_DISABLE_TELEMETRY=1`` set first (else it writes files and sends DNS queries)."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    import onnxruntime

    module: ModuleType = onnxruntime
    return module


def make_session(
    onnx_bytes: bytes, threads: int = 0, providers: Sequence[str] = ("CPUExecutionProvider",)
) -> Any:
    """An ``InferenceSession`` with all graph optimizations, ``threads`` intra-op threads (0: onnxruntime's
    default, one per core) and sequential execution."""
    ort = import_onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(onnx_bytes, sess_options=opts, providers=list(providers))


class OnnxRuntimeEngine:
    """Runs a :class:`LoadedModel` with onnxruntime; batches in one call when the model is batchable, else
    one image at a time. Warms up in the constructor with a full batch of zeros."""

    def __init__(
        self,
        model: LoadedModel,
        max_batch: int,
        threads: int = 0,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.model = model
        self.max_batch = max_batch
        self.name = f"onnxruntime:{providers[0] if providers else 'default'}"
        self._batched = model.batch_dynamic or model.made_batchable
        self._session: Any = make_session(model.onnx_bytes, threads, providers)
        h, w = model.input_hw
        t0 = time.perf_counter()
        self.infer(np.zeros((max_batch, 3, h, w), dtype=np.float32))
        log.info("%s: %s ready (batch %d, %s, %d threads), warm-up %.0f ms", self.name, model.path.name,
                 max_batch, "batched" if self._batched else "looping over batch-1 runs", threads,
                 (time.perf_counter() - t0) * 1000)

    def infer(self, batch: NDArray[np.float32]) -> NDArray[np.float32]:
        """(B, 3, H, W) float32 -> the model's raw output (B, ...), B <= max_batch."""
        if self._session is None:
            raise RuntimeError(f"{self.name}: engine for {self.model.path.name} is closed")
        h, w = self.model.input_hw
        if batch.ndim != 4 or batch.shape[1:] != (3, h, w) or not 1 <= batch.shape[0] <= self.max_batch:
            raise ValueError(f"{self.name}: batch must be (1..{self.max_batch}, 3, {h}, {w}), got {batch.shape}")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        if self._batched:
            return self._run(x)
        return np.concatenate([self._run(x[i : i + 1]) for i in range(x.shape[0])], axis=0)

    def _run(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        outputs = self._session.run([self.model.output_name], {self.model.input_name: x})
        out: NDArray[np.float32] = outputs[0]
        return out

    def close(self) -> None:
        """Release the session; later ``infer`` calls raise."""
        self._session = None
