"""TensorRT backend (TensorRT 10 and 11 Python API): engine built from the (Q/DQ) ONNX, cached on disk.

NOT EXECUTED in this project: TensorRT cannot be installed on any machine available to it. Written against the
public API; the cache key, the cache paths and the fallbacks around it are tested. On TensorRT 11 (no
BuilderFlag.FP16/INT8, no implicit calibration) precision comes from the network itself: a strongly typed network
of the FP16 or Q/DQ INT8 ONNX. On TensorRT 10 the FP16 flag is set for `precision: fp16`; a Q/DQ ONNX builds as
explicit INT8 on both.
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
        """A stable file name: every part that makes an engine unusable elsewhere is in it."""
        text = "|".join(str(v) for v in (self.model_sha256, self.tensorrt_version, self.gpu_name, self.precision,
                                          self.min_batch, self.opt_batch, self.max_batch))
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        gpu = "".join(c if c.isalnum() else "-" for c in self.gpu_name).strip("-").lower()[:40]
        return f"{self.model_sha256[:12]}-trt{self.tensorrt_version}-{gpu}-{self.precision}-b{self.max_batch}-{digest}.engine"


def engine_key(model: LoadedModel, tensorrt_version: str, gpu_name: str, precision: str, max_batch: int) -> EngineKey:
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if precision not in ("fp32", "fp16", "int8"):
        raise ValueError(f"precision must be fp32, fp16 or int8, got {precision!r}")
    opt = max_batch if model.batchable else 1
    return EngineKey(model.sha256, tensorrt_version, gpu_name, precision, 1, opt, max_batch if model.batchable else 1)


def engine_cache_dir() -> Path:
    from daemon.models.fetch import cache_dir

    return cache_dir() / "engines"


def major_version(version: str) -> int:
    try:
        return int(version.split(".", 1)[0])
    except ValueError as exc:
        raise ValueError(f"cannot read a TensorRT version from {version!r}") from exc


class TensorRTEngine:
    """Builds (or loads from the cache) and runs an engine on CuPy device arrays."""

    def __init__(self, model: LoadedModel, max_batch: int, precision: str = "fp16", device_id: int = 0) -> None:
        import cupy
        import tensorrt as trt

        self.model = model
        self.max_batch = max_batch
        self.name = f"tensorrt:{trt.__version__}"
        self._cp = cupy
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        key = engine_key(model, trt.__version__, gpu, precision, max_batch)
        path = engine_cache_dir() / key.filename()
        runtime = trt.Runtime(self._logger)
        if path.is_file():
            self._engine = runtime.deserialize_cuda_engine(path.read_bytes())
            log.info("TensorRT engine loaded from %s", path)
        else:
            blob = self._build(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            self._engine = runtime.deserialize_cuda_engine(blob)
            log.info("TensorRT engine built and cached at %s", path)
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize the engine for {model.path.name}")
        self._context = self._engine.create_execution_context()
        self._stream = cupy.cuda.Stream(non_blocking=True)
        out_shape = tuple(self._engine.get_tensor_shape(model.output_name))
        self._out_tail = tuple(int(d) for d in out_shape[1:])

    def _build(self, key: EngineKey) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        typed = major_version(key.tensorrt_version) >= 11 or key.precision == "int8"
        if typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self.model.onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT could not parse {self.model.path.name}: {errors}")
        config = builder.create_builder_config()
        if key.precision == "fp16" and not typed and hasattr(trt.BuilderFlag, "FP16"):
            config.set_flag(trt.BuilderFlag.FP16)
        h, w = self.model.input_hw
        profile = builder.create_optimization_profile()
        profile.set_shape(self.model.input_name, (key.min_batch, 3, h, w), (key.opt_batch, 3, h, w),
                          (key.max_batch, 3, h, w))
        config.add_optimization_profile(profile)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {self.model.path.name}")
        return bytes(blob)

    def infer(self, batch: Any) -> Any:
        cp = self._cp
        x = cp.ascontiguousarray(cp.asarray(batch))
        n = int(x.shape[0])
        y = cp.empty((n, *self._out_tail), dtype=cp.float32)
        self._context.set_input_shape(self.model.input_name, tuple(x.shape))
        self._context.set_tensor_address(self.model.input_name, int(x.data.ptr))
        self._context.set_tensor_address(self.model.output_name, int(y.data.ptr))
        cp.cuda.get_current_stream().synchronize()
        if not self._context.execute_async_v3(self._stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self._stream.synchronize()
        return y

    def close(self) -> None:
        self._context = None
        self._engine = None
