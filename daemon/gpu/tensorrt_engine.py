"""TensorRT backend (TensorRT 10 and 11 Python API): engine built from the (Q/DQ) ONNX, cached on disk.

NOT EXECUTED in this project: TensorRT cannot be installed on any machine available to it. Written against the
public API; the cache key, the cache paths and the fallbacks around it are tested (with TensorRT absent).

Precision: TensorRT 11 removed BuilderFlag.FP16/INT8 and implicit calibration, so precision comes from the
network itself: FP16 builds a strongly typed network from an FP16 ONNX (converted here with onnxconverter-common),
INT8 a strongly typed network from the INT8 issue's Q/DQ ONNX. TensorRT 10 builds FP16 with BuilderFlag.FP16 on
the FP32 ONNX, and Q/DQ INT8 strongly typed as on 11. TensorRT is imported only after a CUDA GPU was seen:
``trt.Runtime()`` without a GPU returns an object that segfaults on use.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.inference.model import LoadedModel

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


class TensorRTUnavailable(Exception):
    """TensorRT cannot run here; the message says why (no GPU, not installed, import failed)."""


def engine_cache_key(model_sha256: str, tensorrt_version: str, gpu_name: str, precision: str, min_batch: int,
                     opt_batch: int, max_batch: int) -> str:
    """The engine file name: every part that makes an engine unusable elsewhere is in it (pure function)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if len(model_sha256) != 64 or any(c not in "0123456789abcdef" for c in model_sha256):
        raise ValueError(f"model_sha256 must be 64 lowercase hex digits, got {model_sha256!r}")
    if not tensorrt_version or not gpu_name:
        raise ValueError(f"tensorrt_version and gpu_name must be set, got {tensorrt_version!r}, {gpu_name!r}")
    text = "|".join(str(v) for v in (model_sha256, tensorrt_version, gpu_name, precision, min_batch, opt_batch,
                                      max_batch))
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name).strip("-").lower()[:40]
    version = "".join(c if c.isalnum() or c == "." else "-" for c in tensorrt_version)
    return f"{model_sha256[:12]}-trt{version}-{gpu}-{precision}-b{min_batch}-{opt_batch}-{max_batch}-{digest}.engine"


@dataclass(frozen=True, slots=True)
class EngineKey:
    model_sha256: str
    tensorrt_version: str
    gpu_name: str
    precision: str
    min_batch: int
    opt_batch: int
    max_batch: int

    def filename(self) -> str:
        return engine_cache_key(self.model_sha256, self.tensorrt_version, self.gpu_name, self.precision,
                                self.min_batch, self.opt_batch, self.max_batch)


def engine_key(model: LoadedModel, tensorrt_version: str, gpu_name: str, precision: str, max_batch: int) -> EngineKey:
    """The key for ``model``: a batchable model gets the profile 1..max_batch (optimized for max_batch)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    top = max_batch if model.batchable else 1
    key = EngineKey(model.sha256, tensorrt_version, gpu_name, precision, 1, top, top)
    key.filename()  # validates every part
    return key


def engine_cache_dir() -> Path:
    from daemon.models.fetch import cache_dir

    return cache_dir() / "engines"


def major_version(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError as exc:
        raise ValueError(f"cannot read a TensorRT version from {version!r}") from exc


def strongly_typed(tensorrt_version: str, precision: str) -> bool:
    """TensorRT 11 builds only strongly typed networks; Q/DQ INT8 is built strongly typed on 10 as well."""
    return major_version(tensorrt_version) >= 11 or precision == "int8"


def import_tensorrt(device_id: int = 0) -> tuple[Any, str]:
    """(the tensorrt module, the GPU's name), checking for a CUDA GPU before TensorRT is imported."""
    try:
        import cupy
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT needs CuPy and a CUDA GPU; CuPy is not installed ({exc})") from exc
    if not cupy.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU; none was found")
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"TensorRT is not installed ({exc})") from exc
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    raw = props.get("name", b"")
    return tensorrt, raw.decode() if isinstance(raw, bytes) else str(raw)


def _network_onnx(model: LoadedModel, precision: str, typed: bool) -> bytes:
    if typed and precision == "fp16":
        from daemon.gpu.ort_cuda import to_fp16

        return to_fp16(model.onnx_bytes, keep_io_types=False)
    return model.onnx_bytes


def build_serialized(trt: Any, logger: Any, model: LoadedModel, key: EngineKey) -> bytes:
    """Parse the ONNX and build a serialized engine for ``key`` (precision, batch profile)."""
    typed = strongly_typed(key.tensorrt_version, key.precision)
    builder = trt.Builder(logger)
    flags = 0
    if typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_network_onnx(model, key.precision, typed)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {model.path.name}: {errors}")
    config = builder.create_builder_config()
    if key.precision == "fp16" and not typed:
        config.set_flag(trt.BuilderFlag.FP16)
    h, w = model.input_hw
    profile = builder.create_optimization_profile()
    profile.set_shape(model.input_name, (key.min_batch, 3, h, w), (key.opt_batch, 3, h, w), (key.max_batch, 3, h, w))
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {model.path.name} ({key.precision})")
    return bytes(blob)


def cached_engine(trt: Any, logger: Any, model: LoadedModel, key: EngineKey, cache: Path) -> bytes:
    """The serialized engine for ``key`` from ``cache``, built and stored (atomically) when missing."""
    path = cache / key.filename()
    if path.is_file():
        log.info("TensorRT engine from cache %s", path)
        return path.read_bytes()
    log.info("building TensorRT engine %s (%s, batch %d..%d); this takes minutes", path.name, key.precision,
             key.min_batch, key.max_batch)
    blob = build_serialized(trt, logger, model, key)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    log.info("TensorRT engine cached at %s", path)
    return blob


class TensorRTEngine:
    """Builds (or loads from the cache) and runs an engine on CuPy device arrays, on ``stream``."""

    def __init__(self, model: LoadedModel, max_batch: int, precision: str = "fp16", device_id: int = 0,
                 stream: Any = None, cache: Path | None = None) -> None:
        trt, gpu = import_tensorrt(device_id)
        import cupy

        self.model = model
        self.max_batch = max_batch
        self.name = f"tensorrt:{trt.__version__}:{precision}"
        self._cp = cupy
        self._logger = trt.Logger(trt.Logger.WARNING)
        key = engine_key(model, str(trt.__version__), gpu, precision, max_batch)
        blob = cached_engine(trt, self._logger, model, key, cache if cache is not None else engine_cache_dir())
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(blob)
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the engine for {model.path.name}")
        self._context = self._engine.create_execution_context()
        self._stream = stream if stream is not None else cupy.cuda.Stream(non_blocking=True)
        self.input_dtype: Any = trt.nptype(self._engine.get_tensor_dtype(model.input_name))
        self.output_dtype: Any = trt.nptype(self._engine.get_tensor_dtype(model.output_name))
        self._out_tail = tuple(int(d) for d in self._engine.get_tensor_shape(model.output_name)[1:])

    def output_shape(self, n: int) -> tuple[int, ...]:
        return (n, *self._out_tail)

    def infer_into(self, x: Any, out: Any) -> None:
        """Enqueue on the engine's stream and wait for it (same contract as OrtCudaEngine.infer_into)."""
        if x.dtype != self.input_dtype or out.dtype != self.output_dtype:
            raise ValueError(f"{self.name}: input {x.dtype} / output {out.dtype} do not match the engine")
        self._context.set_input_shape(self.model.input_name, tuple(int(d) for d in x.shape))
        self._context.set_tensor_address(self.model.input_name, int(x.data.ptr))
        self._context.set_tensor_address(self.model.output_name, int(out.data.ptr))
        if not self._context.execute_async_v3(int(self._stream.ptr)):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed")
        self._stream.synchronize()

    def infer(self, batch: Any) -> Any:
        cp = self._cp
        x = cp.ascontiguousarray(cp.asarray(batch, dtype=self.input_dtype))
        out = cp.empty(self.output_shape(int(x.shape[0])), dtype=self.output_dtype)
        cp.cuda.get_current_stream().synchronize()
        self.infer_into(x, out)
        return out.astype(cp.float32, copy=False)

    def close(self) -> None:
        self._context = None
        self._engine = None
