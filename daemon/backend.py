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
from daemon.pipeline.runner import cpu_batch_decoder, host_buffer

log = logging.getLogger(__name__)

BOX_BYTES = 24  # x1, y1, x2, y2, score, class as float32: what one final box costs device-to-host


class BackendUnavailable(Exception):
    """The configured backend cannot run here."""


@dataclass(frozen=True, slots=True)
class EngineChoice:
    engine: Engine
    backend: str  # "cpu:onnxruntime", "gpu:dali+onnxruntime-cuda", ...
    reason: str
    gpu_decoder: Any = None  # a DaliDecoder on the GPU path
    allocate: Callable[[tuple[int, ...]], Any] = host_buffer
    batch_decoder: Callable[[Any, Layout, NDArray[np.float32], NDArray[np.float32], int],
                            list[NDArray[np.float32]]] = cpu_batch_decoder
    d2h_bytes_per_box: int = 0


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
    backend, reason = choose(cfg.backend, caps)
    reason = f"{reason}; {cfg.precision} model {path.name}"
    if backend == "unavailable":
        raise BackendUnavailable(reason)
    if backend.startswith("gpu:") and "tensorrt" in backend:
        return _tensorrt(model, cfg, max_batch, backend, reason)
    if backend.startswith("gpu:"):
        return _onnxruntime_cuda(model, cfg, max_batch, backend, reason)
    from daemon.inference.onnxrt import OnnxRuntimeEngine

    return EngineChoice(OnnxRuntimeEngine(model, max_batch=max_batch, threads=cfg.threads), backend, reason)


def _gpu_batch_decoder(raw: Any, layout: Layout, conf: NDArray[np.float32], iou: NDArray[np.float32],
                       max_det: int) -> list[NDArray[np.float32]]:
    from daemon.gpu.postprocess import decode_rows

    return decode_rows(raw, layout, conf, iou, max_det)


def _device_buffer(shape: tuple[int, ...]) -> Any:
    import cupy

    return cupy.zeros(shape, dtype=cupy.float32)


def _onnxruntime_cuda(model: Any, cfg: ModelConfig, max_batch: int, backend: str, reason: str) -> EngineChoice:
    from daemon.gpu.dali_decode import DaliDecoder
    from daemon.gpu.ort_cuda import OrtCudaEngine

    engine = OrtCudaEngine(model, max_batch=max_batch, fp16=cfg.precision == "fp16")
    h, _w = model.input_hw
    decoder = DaliDecoder(h, max_batch)
    return EngineChoice(engine, backend, reason, decoder, _device_buffer, _gpu_batch_decoder, BOX_BYTES)


def _tensorrt(model: Any, cfg: ModelConfig, max_batch: int, backend: str, reason: str) -> EngineChoice:
    from daemon.gpu.dali_decode import DaliDecoder
    from daemon.gpu.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(model, max_batch=max_batch, precision=cfg.precision)
    h, _w = model.input_hw
    return EngineChoice(engine, backend, reason, DaliDecoder(h, max_batch), _device_buffer, _gpu_batch_decoder,
                        BOX_BYTES)
