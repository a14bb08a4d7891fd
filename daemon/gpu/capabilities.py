"""What this machine can run on the GPU, and which backend `auto` picks (with the reason, for logs and stats)."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Capabilities:
    gpu: bool
    gpu_name: str
    cupy: bool
    dali: bool
    nvimgcodec: bool
    onnxruntime_cuda: bool
    tensorrt: str | None  # version, or None
    notes: tuple[str, ...]

    @property
    def gpu_path(self) -> bool:
        """The full GPU path needs CuPy, a GPU decoder, and a GPU inference backend."""
        return self.gpu and self.cupy and (self.dali or self.nvimgcodec) and (
            self.onnxruntime_cuda or self.tensorrt is not None)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def detect() -> Capabilities:
    notes: list[str] = []
    gpu, name, cupy_ok = False, "", False
    if _has("cupy"):
        try:
            import cupy

            gpu = bool(cupy.cuda.is_available())
            cupy_ok = True
            if gpu:
                props = cupy.cuda.runtime.getDeviceProperties(0)
                raw = props.get("name", b"")
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception as exc:  # a broken driver or CUDA runtime: no usable GPU
            notes.append(f"cupy: {exc}")
    else:
        notes.append("cupy not installed")
    if not gpu:
        return Capabilities(False, "", cupy_ok, False, False, False, None, (*notes, "no CUDA GPU"))
    dali = _has("nvidia.dali")
    nvimg = _has("nvidia.nvimgcodec")
    ort_cuda = False
    if _has("onnxruntime"):
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        try:
            import onnxruntime as ort

            ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
        except Exception as exc:
            notes.append(f"onnxruntime: {exc}")
    trt_version: str | None = None
    if _has("tensorrt"):  # imported only now that a GPU exists: TensorRT without a GPU can crash the process
        try:
            import tensorrt

            trt_version = str(tensorrt.__version__)
        except Exception as exc:
            notes.append(f"tensorrt: {exc}")
    return Capabilities(True, name, cupy_ok, dali, nvimg, ort_cuda, trt_version, tuple(notes))


def choose(backend: str, caps: Capabilities) -> tuple[str, str]:
    """(backend id, reason) for a configured backend of auto | onnxruntime | tensorrt."""
    if not caps.gpu:
        if backend == "tensorrt":
            return "unavailable", "backend tensorrt needs a CUDA GPU; none was found"
        return "cpu:onnxruntime", "no CUDA GPU found" if backend == "auto" else "backend onnxruntime asked for"
    decoder = "dali" if caps.dali else "nvimgcodec" if caps.nvimgcodec else None
    if backend in ("auto", "tensorrt") and caps.tensorrt and decoder and caps.cupy:
        return f"gpu:{decoder}+tensorrt", f"{caps.gpu_name}: TensorRT {caps.tensorrt}, {decoder} decode"
    if backend == "tensorrt":
        return "unavailable", f"backend tensorrt asked for, but TensorRT is not installed on {caps.gpu_name}"
    if caps.onnxruntime_cuda and decoder and caps.cupy:
        why = "TensorRT not installed" if backend == "auto" else "backend onnxruntime asked for"
        return f"gpu:{decoder}+onnxruntime-cuda", f"{caps.gpu_name}: {why}; {decoder} decode, onnxruntime CUDA EP"
    missing = [n for n, ok in (("DALI or nvImageCodec", decoder), ("onnxruntime-gpu", caps.onnxruntime_cuda),
                               ("cupy", caps.cupy)) if not ok]
    return "cpu:onnxruntime", f"{caps.gpu_name} found but {', '.join(missing)} missing: CPU path"
