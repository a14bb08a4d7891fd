"""Pick the inference backend the machine can run, and say why (logged at start and published in stats)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from daemon.config.model import ModelConfig
from daemon.inference.engine import Engine
from daemon.inference.model import Layout, load_model
from daemon.pipeline.runner import NO_SYNC, StageSync, cpu_batch_decoder, host_buffer

log = logging.getLogger(__name__)

BOX_BYTES = 24  # x1, y1, x2, y2, score, class as float32: what one final box costs device-to-host


class BackendUnavailable(Exception):
    """The configured backend cannot run here."""


@dataclass(frozen=True, slots=True)
class EngineChoice:
    engine: Engine
    backend: str  # "cpu:onnxruntime", "gpu:dali+onnxruntime-cuda", ...
    reason: str
    gpu_decoder: Any = None  # a daemon.gpu.decoders.GpuDecoder on the GPU path
    allocate: Callable[[tuple[int, ...]], Any] = host_buffer
    batch_decoder: Callable[[Any, Layout, NDArray[np.float32], NDArray[np.float32], int],
                            list[NDArray[np.float32]]] = cpu_batch_decoder
    d2h_bytes_per_box: int = 0
    sync: StageSync = NO_SYNC  # the GPU path's per-stage CUDA streams
    pad_to_batch: bool = False  # the engine runs every batch at max_batch rows (GPU: one shape)
    gpu_video: bool = False  # H.264/H.265 cameras hand packets to NVDEC (daemon.gpu.nvdec) instead of decoding
    gpu_video_reason: str = "CPU path: H.264/H.265 decoded by PyAV"


def resolve_model_path(cfg: ModelConfig) -> Path:
    from daemon.cameras import resolve_builtin

    if cfg.precision == "int8" and cfg.int8_path is not None:
        return resolve_builtin(cfg.int8_path)
    return resolve_builtin(cfg.path)


def build_engine(cfg: ModelConfig, max_batch: int) -> EngineChoice:
    """`auto`: the GPU path where its packages and a GPU exist, else onnxruntime on the CPU."""
    from daemon.gpu.capabilities import choose, detect

    path = resolve_model_path(cfg)
    model = load_model(path, class_names=cfg.class_names)
    caps = detect()
    backend, reason = choose(cfg.backend, caps, cfg.gpu_decoder)
    reason = f"{reason}; {cfg.precision} model {path.name}"
    if backend == "unavailable":
        raise BackendUnavailable(reason)
    if backend.startswith("gpu:") and "tensorrt" in backend:
        return _tensorrt(model, cfg, max_batch, backend, reason)
    if backend.startswith("gpu:"):
        return _onnxruntime_cuda(model, cfg, max_batch, backend, reason)
    from daemon.inference.onnxrt import OnnxRuntimeEngine

    return EngineChoice(OnnxRuntimeEngine(model, max_batch=max_batch, threads=cfg.threads), backend, reason)


class _GpuRows:
    """The post stage's row decoder on the GPU: one GpuPostprocessor (buffers and pinned host memory reused),
    run on the calling thread's current stream (the runner's post stream)."""

    def __init__(self) -> None:
        self._post: Any = None

    def __call__(self, raw: Any, layout: Layout, conf: NDArray[np.float32], iou: NDArray[np.float32],
                 max_det: int) -> list[NDArray[np.float32]]:
        from daemon.gpu.postprocess import GpuPostprocessor, decode_rows

        if self._post is None or self._post.max_det != max_det:
            self._post = GpuPostprocessor(max_det)
        return decode_rows(raw, layout, conf, iou, max_det, self._post)


def _gpu_choice(engine: Any, cfg: ModelConfig, max_batch: int, backend: str, reason: str, stages: Any) -> EngineChoice:
    import cupy

    from daemon.gpu.decoders import make_decoder

    decoder_name = backend.removeprefix("gpu:").split("+")[0]
    h, _w = engine.model.input_hw
    decoder = make_decoder(decoder_name, h, max_batch, engine.input_dtype, stages.device_id)
    dtype = engine.input_dtype
    video, video_reason = _gpu_video(cfg)

    def allocate(shape: tuple[int, ...]) -> Any:
        with cupy.cuda.Device(stages.device_id):
            return cupy.zeros(shape, dtype=dtype)

    return EngineChoice(engine, backend, reason, decoder, allocate, _GpuRows(), BOX_BYTES, stages, pad_to_batch=True,
                        gpu_video=video, gpu_video_reason=video_reason)


def _gpu_video(cfg: ModelConfig) -> tuple[bool, str]:
    """NVDEC for H.264/H.265 cameras on the GPU path, or PyAV on the CPU, and why (logged by the caller)."""
    from daemon.gpu.nvdec import choose_video, nvdec_status

    try:
        return choose_video(cfg.gpu_video_decoder, nvdec_status())
    except RuntimeError as exc:
        raise BackendUnavailable(str(exc)) from exc


def _onnxruntime_cuda(model: Any, cfg: ModelConfig, max_batch: int, backend: str, reason: str) -> EngineChoice:
    from daemon.gpu.ort_cuda import OrtCudaEngine
    from daemon.gpu.streams import CudaStages

    stages = CudaStages(cfg.gpu_device)
    fp16 = cfg.precision == "fp16"
    engine = OrtCudaEngine(model, max_batch=max_batch, device_id=cfg.gpu_device, fp16=fp16, stream=stages.infer,
                           nhwc=fp16)
    return _gpu_choice(engine, cfg, max_batch, backend, reason, stages)


def _tensorrt(model: Any, cfg: ModelConfig, max_batch: int, backend: str, reason: str) -> EngineChoice:
    from daemon.gpu.streams import CudaStages
    from daemon.gpu.tensorrt_engine import TensorRTEngine

    stages = CudaStages(cfg.gpu_device)
    engine = TensorRTEngine(model, max_batch=max_batch, precision=cfg.precision, device_id=cfg.gpu_device,
                            stream=stages.infer)
    return _gpu_choice(engine, cfg, max_batch, backend, reason, stages)
