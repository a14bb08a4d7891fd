"""What this machine can run on the GPU, and which backend `auto` picks (with the reason, for logs and stats).

Every GPU import is guarded and happens only when ``detect`` runs (never at import time). TensorRT is imported
only after CuPy saw a CUDA GPU: without one, TensorRT's runtime can crash the process.

Fallback order for ``backend: auto``: TensorRT (+ DALI or nvImageCodec) -> onnxruntime-gpu's CUDA EP (+ DALI or
nvImageCodec) -> onnxruntime on the CPU; ``onnxruntime`` skips TensorRT; ``tensorrt`` fails with the reason
instead of falling back.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, replace

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DECODERS = ("auto", "dali", "nvimgcodec")


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
    backend: str = ""  # the choice for the configured backend (see ``choose``), once resolved
    reason: str = ""

    @property
    def decoder(self) -> str | None:
        """The GPU JPEG decoder ``auto`` picks: DALI where installed, else nvImageCodec (the only one on Jetson).
        DALI's pixels give boxes within 2 px of the CPU path; nvImageCodec is about twice as fast on an H200 (the
        daemon: 2,016 vs 1,077 frames/s) but moved bus.jpg's bus by 5 px (1 % of its size), so it is opt-in
        (``model.gpu_decoder: nvimgcodec``) where DALI exists. docs/results/2026-11-28-h200-*."""
        return "dali" if self.dali else "nvimgcodec" if self.nvimgcodec else None

    def pick_decoder(self, wanted: str) -> str | None:
        """``wanted`` (auto | dali | nvimgcodec) if installed, else None."""
        if wanted == "auto":
            return self.decoder
        return wanted if getattr(self, wanted, False) else None

    @property
    def gpu_path(self) -> bool:
        """The full GPU path needs CuPy, a GPU decoder, and a GPU inference backend."""
        return self.gpu and self.cupy and self.decoder is not None and (
            self.onnxruntime_cuda or self.tensorrt is not None)


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _cuda_gpu(notes: list[str]) -> tuple[bool, bool, str]:
    """(cupy importable, a CUDA GPU usable, its name)."""
    if not _has("cupy"):
        notes.append("cupy not installed")
        return False, False, ""
    try:
        import cupy

        if not cupy.cuda.is_available():
            return True, False, ""
        raw = cupy.cuda.runtime.getDeviceProperties(0).get("name", b"")
        return True, True, raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception as exc:  # a broken driver or CUDA runtime: no usable GPU
        notes.append(f"cupy: {exc}")
        return True, False, ""


def _ort_cuda(notes: list[str]) -> bool:
    if not _has("onnxruntime"):
        notes.append("onnxruntime not installed")
        return False
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    try:
        import onnxruntime as ort

        return "CUDAExecutionProvider" in ort.get_available_providers()
    except Exception as exc:
        notes.append(f"onnxruntime: {exc}")
        return False


def _tensorrt(notes: list[str]) -> str | None:
    if not _has("tensorrt"):
        notes.append("tensorrt not installed")
        return None
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except Exception as exc:
        notes.append(f"tensorrt: {exc}")
        return None


def detect(backend: str | None = None) -> Capabilities:
    """Probe the machine; with ``backend`` (auto | onnxruntime | tensorrt) the result carries the choice."""
    notes: list[str] = []
    cupy_ok, gpu, name = _cuda_gpu(notes)
    if not gpu:
        caps = Capabilities(False, "", cupy_ok, False, False, False, None, (*notes, "no CUDA GPU"))
    else:
        caps = Capabilities(True, name, cupy_ok, _has("nvidia.dali"), _has("nvidia.nvimgcodec"), _ort_cuda(notes),
                            _tensorrt(notes), tuple(notes))
    return caps if backend is None else resolve(backend, caps)


def resolve(backend: str, caps: Capabilities) -> Capabilities:
    """``caps`` with the chosen backend and the reason filled in (logged once here)."""
    chosen, reason = choose(backend, caps)
    log.info("backend %s -> %s: %s", backend, chosen, reason)
    return replace(caps, backend=chosen, reason=reason)


def choose(backend: str, caps: Capabilities, decoder_wanted: str = "auto") -> tuple[str, str]:
    """(backend id, reason) for a configured backend of auto | onnxruntime | tensorrt and GPU decoder of
    auto | dali | nvimgcodec.

    Ids: ``gpu:<decoder>+tensorrt``, ``gpu:<decoder>+onnxruntime-cuda``, ``cpu:onnxruntime``, or ``unavailable``
    (an explicit ``tensorrt``, or an explicit decoder, that cannot run here).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if decoder_wanted not in DECODERS:
        raise ValueError(f"gpu_decoder must be one of {', '.join(DECODERS)}, got {decoder_wanted!r}")
    if not caps.gpu:
        if backend == "tensorrt":
            return "unavailable", "backend tensorrt needs a CUDA GPU; none was found"
        return "cpu:onnxruntime", "no CUDA GPU found" if backend == "auto" else "backend onnxruntime asked for"
    decoder = caps.pick_decoder(decoder_wanted)
    if decoder is None and decoder_wanted != "auto" and caps.decoder is not None:
        return "unavailable", f"gpu_decoder {decoder_wanted} asked for, but it is not installed on {caps.gpu_name} " \
                              f"({caps.decoder} is)"
    if backend in ("auto", "tensorrt") and caps.tensorrt and decoder and caps.cupy:
        return f"gpu:{decoder}+tensorrt", f"{caps.gpu_name}: TensorRT {caps.tensorrt}, {decoder} decode"
    if backend == "tensorrt":
        if not caps.tensorrt:
            return "unavailable", f"backend tensorrt asked for, but TensorRT is not installed on {caps.gpu_name}"
        return "unavailable", f"backend tensorrt asked for, but no GPU JPEG decoder (DALI or nvImageCodec) on " \
                              f"{caps.gpu_name}"
    if caps.onnxruntime_cuda and decoder and caps.cupy:
        why = "TensorRT not installed" if backend == "auto" and not caps.tensorrt else "backend onnxruntime asked for"
        return f"gpu:{decoder}+onnxruntime-cuda", f"{caps.gpu_name}: {why}; {decoder} decode, onnxruntime CUDA EP"
    missing = [n for n, ok in (("DALI or nvImageCodec", decoder), ("onnxruntime-gpu", caps.onnxruntime_cuda),
                               ("cupy", caps.cupy)) if not ok]
    return "cpu:onnxruntime", f"{caps.gpu_name} found but {', '.join(missing)} missing: CPU path"
