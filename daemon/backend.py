"""Pick the inference backend the machine can run, and say why."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from daemon.config.model import ModelConfig
from daemon.inference.engine import Engine
from daemon.inference.model import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineChoice:
    engine: Engine
    backend: str  # "cpu:onnxruntime", ...
    reason: str


def resolve_model_path(cfg: ModelConfig) -> Path:
    from daemon.cameras import resolve_builtin

    if cfg.precision == "int8" and cfg.int8_path is not None:
        return resolve_builtin(cfg.int8_path)
    return resolve_builtin(cfg.path)


def build_engine(cfg: ModelConfig, max_batch: int) -> EngineChoice:
    """`auto`: the GPU path where its packages and a GPU exist, else onnxruntime on the CPU."""
    path = resolve_model_path(cfg)
    model = load_model(path, class_names=cfg.class_names)
    if cfg.backend == "tensorrt":
        reason = "backend tensorrt asked for, but TensorRT with a CUDA GPU was not found on this machine"
        raise BackendUnavailable(reason)
    from daemon.inference.onnxrt import OnnxRuntimeEngine

    why = "no CUDA GPU found" if cfg.backend == "auto" else "backend onnxruntime asked for"
    engine = OnnxRuntimeEngine(model, max_batch=max_batch, threads=cfg.threads)
    return EngineChoice(engine, "cpu:onnxruntime", f"{why}; {cfg.precision} model {path.name}")


class BackendUnavailable(Exception):
    """The configured backend cannot run here."""
