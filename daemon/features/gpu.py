"""`delta.mode: features` on the GPU path: the backbone and head sub-models run with onnxruntime-gpu's CUDA
execution provider on device arrays (IO binding on CuPy pointers, as daemon.gpu.ort_cuda.OrtCudaEngine does),
the reference maps stay on the device, crops are cut, stacked and spliced in CuPy.

Streams: both sessions compute on ``stream`` (``user_compute_stream``; the runner passes its infer stage's
stream, which is the infer thread's current CuPy stream), so CuPy's crops and splices and onnxruntime's kernels
are ordered on one stream; onnxruntime waits for that stream at the end of each run, so what a run wrote is
complete when it returns. Without a stream, onnxruntime uses its own and the current stream is waited for
before each run.

Shapes: the CUDA EP plans every convolution again for an input shape it has not seen, so crops are grown to
multiples of ``BUCKET`` pixels per side (few shapes; the pastes only gain context), convolution algorithms are
chosen by cuDNN's heuristics instead of an exhaustive search per shape, and the sub-models do not ask for NHWC
(its plans are the ones the runner's measurement found slow to rebuild). FP16: the sub-models are converted like
the engine (FP16 inputs, maps and output); maps are then kept in FP16 (half the device memory and state bytes).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from daemon.features.cache import FeatureCache
from daemon.features.engine import DEFAULT_HALOS, FeatureDeltaRunner
from daemon.features.live import FeatureStage
from daemon.features.split import SplitModel, split_model
from daemon.inference.model import LoadedModel

log = logging.getLogger(__name__)

BUCKET = 64  # crop sides on the GPU: multiples of this many input pixels
ALGO_SEARCH = "HEURISTIC"


class FeatureStageUnavailable(Exception):
    """The GPU feature stage cannot be built here; the message says why."""


def _dtype(ort_type: str) -> Any:
    if ort_type == "tensor(float16)":
        return np.dtype(np.float16)
    if ort_type == "tensor(float)":
        return np.dtype(np.float32)
    raise FeatureStageUnavailable(f"unsupported sub-model tensor type {ort_type}")


class CudaSession:
    """One sub-model on the CUDA EP; ``run`` binds device arrays by pointer (inputs and preallocated outputs)."""

    def __init__(self, onnx_bytes: bytes, what: str, device_id: int, stream: Any = None,
                 algo_search: str = ALGO_SEARCH) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import cupy
        import onnxruntime as ort

        self._cp = cupy
        self._device = device_id
        self._stream = stream
        cuda: dict[str, str] = {"device_id": str(device_id), "cudnn_conv_algo_search": algo_search}
        if stream is not None:
            cuda["user_compute_stream"] = str(int(stream.ptr))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        self._session = ort.InferenceSession(onnx_bytes, sess_options=opts,
                                             providers=[("CUDAExecutionProvider", cuda), "CPUExecutionProvider"])
        if "CUDAExecutionProvider" not in self._session.get_providers():
            raise FeatureStageUnavailable(f"onnxruntime did not enable the CUDA execution provider for the {what}")
        self.inputs: dict[str, Any] = {i.name: _dtype(i.type) for i in self._session.get_inputs()}
        self.outputs: dict[str, Any] = {o.name: _dtype(o.type) for o in self._session.get_outputs()}
        self.output_shapes: dict[str, list[Any]] = {o.name: list(o.shape) for o in self._session.get_outputs()}

    def run(self, feeds: Mapping[str, Any], outputs: Mapping[str, Any]) -> None:
        """Contiguous device arrays in ``feeds`` are read, those in ``outputs`` written; returns when done."""
        io = self._session.io_binding()
        for name, a in feeds.items():
            io.bind_input(name, "cuda", self._device, np.dtype(a.dtype), tuple(int(v) for v in a.shape),
                          int(a.data.ptr))
        for name, a in outputs.items():
            io.bind_output(name, "cuda", self._device, np.dtype(a.dtype), tuple(int(v) for v in a.shape),
                           int(a.data.ptr))
        if self._stream is None:
            self._cp.cuda.get_current_stream().synchronize()  # CuPy's writes land before onnxruntime reads
        self._session.run_with_iobinding(io)


class CudaHalves:
    """daemon.features.engine.Halves on the device: CuPy arrays in and out."""

    def __init__(self, split: SplitModel, device_id: int = 0, stream: Any = None, fp16: bool = False) -> None:
        import cupy

        self.xp: Any = cupy
        self._taps = split.taps
        self._input = split.model.input_name
        self._output = split.model.output_name
        self._backbone = _session(split.backbone_bytes, "backbone", device_id, stream, fp16)
        self._head = _session(split.head_bytes, "head", device_id, stream, fp16)
        self.input_dtype: Any = self._backbone.inputs[self._input]
        self.map_dtype: Any = self._backbone.outputs[split.taps[0].name]
        tail = self._head.output_shapes[self._output][1:]
        if not all(isinstance(d, int) for d in tail):
            raise FeatureStageUnavailable(f"head output {self._output!r} has symbolic dims {tail}")
        self._tail = tuple(int(d) for d in tail)

    def backbone(self, images: Any) -> list[Any]:
        cp = self.xp
        x = cp.ascontiguousarray(cp.asarray(images).astype(self.input_dtype, copy=False))
        n, _c, h, w = (int(v) for v in x.shape)
        outs = {t.name: cp.empty((n, t.channels, h // t.stride, w // t.stride), self._backbone.outputs[t.name])
                for t in self._taps}
        self._backbone.run({self._input: x}, outs)
        return [outs[t.name] for t in self._taps]

    def head(self, maps: Sequence[Any]) -> Any:
        cp = self.xp
        feeds = {t.name: cp.ascontiguousarray(m.astype(self._head.inputs[t.name], copy=False))
                 for t, m in zip(self._taps, maps, strict=True)}
        out = cp.empty((int(maps[0].shape[0]), *self._tail), self._head.outputs[self._output])
        self._head.run(feeds, {self._output: out})
        return out if out.dtype == cp.float32 else out.astype(cp.float32)


def _session(onnx_bytes: bytes, what: str, device_id: int, stream: Any, fp16: bool) -> CudaSession:
    from daemon.gpu.ort_cuda import for_cuda_ep, to_fp16

    onnx_bytes = for_cuda_ep(onnx_bytes)
    if not fp16:
        return CudaSession(onnx_bytes, what, device_id, stream)

    try:
        return CudaSession(to_fp16(onnx_bytes, keep_io_types=False), what, device_id, stream)
    except FeatureStageUnavailable:
        raise
    except Exception as exc:
        log.warning("features %s with FP16 inputs/outputs failed (%s); keeping FP32 at its edges", what, exc)
        return CudaSession(to_fp16(onnx_bytes, keep_io_types=True), what, device_id, stream)


def gpu_runner(split: SplitModel, device_id: int = 0, stream: Any = None, fp16: bool = False,
               halo: int | Sequence[int] = DEFAULT_HALOS, bucket: int = BUCKET,
               warmup: bool = True) -> FeatureDeltaRunner:
    """A FeatureDeltaRunner whose halves run on GPU ``device_id`` (on ``stream``); warmed up at the full input
    (backbone and head, batch 1) so the first frame does not pay for planning."""
    import cupy

    with cupy.cuda.Device(device_id):
        runner = FeatureDeltaRunner(split, halo, halves=CudaHalves(split, device_id, stream, fp16), bucket=bucket)
        if warmup:
            t0 = time.perf_counter()
            h, w = split.model.input_hw
            with stream if stream is not None else cupy.cuda.get_current_stream():
                runner.full(cupy.zeros((1, 3, h, w), dtype=np.float32))
                cupy.cuda.get_current_stream().synchronize()
            log.info("features on GPU %d: backbone and head ready (maps %s, crops in %d px steps), warm-up %.0f ms",
                     device_id, np.dtype(runner.map_dtype).name, bucket, (time.perf_counter() - t0) * 1000)
    return runner


def build_gpu_stage(model: LoadedModel, cache: FeatureCache, device_id: int = 0, stream: Any = None,
                    fp16: bool = False) -> FeatureStage:
    """The GPU path's FeatureStage; FeatureStageUnavailable (with the reason) when CuPy or onnxruntime's CUDA EP
    is missing; a model that cannot be split raises daemon.features.split.SplitError."""
    try:
        import cupy  # noqa: F401
    except ImportError as exc:
        raise FeatureStageUnavailable(f"CuPy is not installed ({exc})") from exc
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise FeatureStageUnavailable(f"onnxruntime is not installed ({exc})") from exc
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise FeatureStageUnavailable("onnxruntime has no CUDA execution provider (onnxruntime-gpu not installed)")
    return FeatureStage(gpu_runner(split_model(model), device_id, stream, fp16), cache)
