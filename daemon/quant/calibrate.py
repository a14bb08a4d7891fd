"""Post-training INT8 calibration of a YOLO ONNX model into a Q/DQ (or QOperator) ONNX with onnxruntime.

Two targets, two files (one form cannot serve both):

* ``tensorrt``: QDQ with symmetric int8 activations (per tensor) and weights (per output channel, axis 0 for
  Conv), zero points 0, biases left in float, and Q/DQ only on the inputs of weighted ops (Conv, Gemm, MatMul):
  the placement TensorRT recommends, which also makes onnxruntime's simulation match what TensorRT computes.
* ``cpu``: what onnxruntime runs fastest on x86: uint8 activations (asymmetric) with int8 per-channel weights
  (U8S8), every quantizable op quantized so tensors stay 8-bit between layers; QDQ or QOperator format.

Calibration is driven chunk by chunk through onnxruntime's own calibrators (``create_calibrator``): its
histogram calibrators otherwise hold every intermediate tensor of every frame in memory (~0.5 GB per frame for
yolov8n). Entropy is created with ``num_bins=2048, num_quantized_bins=128``: with ``quantize_static``'s defaults
(128/128) the KL search has a single candidate and the result is exactly MinMax. The ranges are saved (and can be
reused: quantizing other keep sets costs no second calibration), then handed to ``quantize_static`` through its
calibration cache.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from daemon.quant.frames import DEFAULT_MAX_PIXELS, SourceFrame, iter_prepared
from daemon.quant.keep import DEFAULT_KEEP, resolve_keep
from daemon.quant.report import CalibrationReport, TensorRange

log = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy"]
Target = Literal["tensorrt", "cpu"]
CpuFormat = Literal["qdq", "qoperator"]
METHODS: tuple[Method, ...] = ("minmax", "percentile", "entropy")
TARGETS: tuple[Target, ...] = ("tensorrt", "cpu")
DEFAULT_METHOD: Method = "percentile"  # best measured (docs/int8-results.md)
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
RANGES_VERSION = 1


class CalibrationError(Exception):
    """Calibration could not run; the message names the model, frames or option at fault."""


@dataclass(frozen=True, slots=True)
class CalibrationOptions:
    """Knobs beyond method/target/keep. ``chunk``: frames per calibrator pass (memory ~0.5 GB a frame)."""

    percentile: float = 99.999
    entropy_bins: int = 2048
    entropy_quantized_bins: int = 128
    chunk: int = 4
    cpu_format: CpuFormat = "qdq"
    reduce_range: bool = False  # 7-bit weights: only for x86 CPUs without VNNI (U8S8 saturation)
    ranges_path: Path | None = None  # reuse matching ranges from here, else compute and save them here
    fast_dfl: bool = True  # cpu target: DFL softmax on the last axis (same outputs, faster on onnxruntime)
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True, slots=True)
class _TargetSpec:
    quant_format: str  # "QDQ" | "QOperator"
    activation_type: str  # QuantType member name
    weight_type: str
    symmetric_activations: bool
    op_types: tuple[str, ...]  # empty: every op type onnxruntime can quantize
    extra: dict[str, Any]


def _target_spec(target: Target, options: CalibrationOptions) -> _TargetSpec:
    if target == "tensorrt":
        return _TargetSpec("QDQ", "QInt8", "QInt8", True, WEIGHTED_OPS, {
            "ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
            "OpTypesToExcludeOutputQuantization": list(WEIGHTED_OPS),
        })
    if target == "cpu":
        fmt = "QDQ" if options.cpu_format == "qdq" else "QOperator"
        return _TargetSpec(fmt, "QUInt8", "QInt8", False, (), {"ActivationSymmetric": False, "WeightSymmetric": True})
    raise CalibrationError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def method_options(method: Method, target: Target, options: CalibrationOptions) -> dict[str, float | int | bool | str]:
    """The calibrator's extra options for a method (what the report records)."""
    symmetric = target == "tensorrt"
    if method == "minmax":
        return {"symmetric": symmetric}
    if method == "percentile":
        return {"percentile": options.percentile, "num_bins": 2048, "symmetric": symmetric}
    if method == "entropy":
        return {"num_bins": options.entropy_bins, "num_quantized_bins": options.entropy_quantized_bins}
    raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")


def calibrate(
    model_path: Path | str,
    frames: Sequence[SourceFrame],
    method: Method = DEFAULT_METHOD,
    target: Target = "tensorrt",
    keep: Sequence[str] | None = None,
    out_path: Path | str | None = None,
    options: CalibrationOptions | None = None,
    frame_sources: Sequence[str] = (),
) -> CalibrationReport:
    """Calibrate ``model_path`` on ``frames`` and write the INT8 model (default ``<model>.int8.<target>.onnx``)
    plus ``<out>.calib.json``; ``keep`` None: the target's default (keep.DEFAULT_KEEP). Returns the report
    (``trt_check`` filled for the tensorrt target)."""
    import onnx

    from daemon.inference.onnxrt import import_onnxruntime
    from daemon.quant.trtcheck import check_trt_qdq

    opts = options or CalibrationOptions()
    model_path = Path(model_path)
    out = Path(out_path) if out_path is not None else model_path.with_suffix(f".int8.{target}.onnx")
    if not frames:
        raise CalibrationError(f"calibrating {model_path}: no frames given")
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    spec = _target_spec(target, opts)
    keep = DEFAULT_KEEP[target] if keep is None else tuple(keep)
    proto = onnx.load(str(model_path))
    kept = resolve_keep(proto.graph, keep)
    input_name, input_hw = _input_of(model_path, proto)
    m_opts = method_options(method, target, opts)
    t0 = time.perf_counter()
    ranges = _ranges(model_path, frames, input_name, input_hw, method, spec, m_opts, opts)
    t1 = time.perf_counter()
    _quantize(model_path, out, ranges, method, spec, kept, opts)
    meta = {"method": method, "target": target, "keep": list(keep), "frames": [f.digest for f in frames],
            "method_options": m_opts}
    rewritten = _finish(out, meta, fast_dfl=target == "cpu" and opts.fast_dfl,
                        float_kept=target == "tensorrt" and bool(kept), kept=kept)
    t2 = time.perf_counter()
    qproto = onnx.load(str(out))
    quantized, floating, qdq = op_counts(qproto, kept)
    widest = sorted(ranges.items(), key=lambda kv: kv[1][1] - kv[1][0], reverse=True)[:10]
    report = CalibrationReport(
        model=str(model_path), model_sha256=_sha256(model_path), out_path=str(out), method=method, target=target,
        quant_format=spec.quant_format, activation_type=spec.activation_type, weight_type=spec.weight_type,
        per_channel=True, symmetric_activations=spec.symmetric_activations, keep=tuple(keep), kept_nodes=kept,
        frame_sources=tuple(frame_sources), frame_count=len(frames), frame_digests=tuple(f.digest for f in frames),
        method_options=m_opts, fp32_bytes=model_path.stat().st_size, int8_bytes=out.stat().st_size,
        quantized_ops=quantized, float_ops=floating, qdq_nodes=qdq, calibrate_s=round(t1 - t0, 2),
        quantize_s=round(t2 - t1, 2), onnxruntime_version=import_onnxruntime().__version__,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        widest_ranges=tuple(TensorRange(k, lo, hi) for k, (lo, hi) in widest),
        trt_check=check_trt_qdq(qproto) if target == "tensorrt" else None,
        notes=("DFL softmax moved to the last axis (identical outputs; onnxruntime's softmax is slow on other "
               "axes)",) if rewritten else (),
    )
    report.write_json(out.with_suffix(".calib.json"))
    log.info("calibrated %s -> %s (%s, %s, %d kept nodes, %.3fx size)", model_path.name, out, target, method,
             len(kept), report.size_ratio)
    return report


def _input_of(model_path: Path, proto: Any) -> tuple[str, tuple[int, int]]:
    init = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init]
    if len(inputs) != 1:
        raise CalibrationError(f"model {model_path}: expected one input, found {[i.name for i in inputs]}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[2] <= 0 or dims[3] <= 0:
        raise CalibrationError(f"model {model_path}: input {inputs[0].name!r} must be [B,3,H,W] with a fixed "
                               f"H and W, got {dims}")
    return inputs[0].name, (dims[2], dims[3])


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _Reader:
    """onnxruntime CalibrationDataReader over frames, preprocessed one at a time like the live pipeline."""

    def __init__(self, input_name: str, frames: Sequence[SourceFrame], input_hw: tuple[int, int],
                 max_pixels: int) -> None:
        self._name = input_name
        self._it = iter_prepared(frames, input_hw, max_pixels)

    def get_next(self) -> dict[str, np.ndarray] | None:
        nxt = next(self._it, None)
        return None if nxt is None else {self._name: nxt.tensor[None]}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while (item := self.get_next()) is not None:
            yield item


def _ranges(
    model_path: Path, frames: Sequence[SourceFrame], input_name: str, input_hw: tuple[int, int], method: Method,
    spec: _TargetSpec, m_opts: dict[str, float | int | bool | str], opts: CalibrationOptions,
) -> dict[str, tuple[float, float]]:
    """Ranges from the cache when it matches exactly (model, method, options, op types, frames), else computed."""
    key = {"version": RANGES_VERSION, "model_sha256": _sha256(model_path), "method": method,
           "method_options": m_opts, "op_types": list(spec.op_types), "frames": [f.digest for f in frames]}
    cache = opts.ranges_path
    if cache is not None and cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("key") == key:
            log.info("calibration ranges reused from %s", cache)
            return {k: (float(v[0]), float(v[1])) for k, v in data["ranges"].items()}
        log.info("calibration ranges in %s are for other settings or frames; recomputing", cache)
    ranges = compute_ranges(model_path, frames, input_name, input_hw, method, spec.op_types, m_opts, opts)
    if cache is not None:
        tmp = cache.with_name(cache.name + ".tmp")
        tmp.write_text(json.dumps({"key": key, "ranges": ranges}))
        os.replace(tmp, cache)
    return ranges


def compute_ranges(
    model_path: Path, frames: Sequence[SourceFrame], input_name: str, input_hw: tuple[int, int], method: Method,
    op_types: Sequence[str], m_opts: dict[str, float | int | bool | str], opts: CalibrationOptions,
) -> dict[str, tuple[float, float]]:
    """Run onnxruntime's calibrator for ``method`` over the frames, ``opts.chunk`` frames per pass."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    from daemon.inference.onnxrt import import_onnxruntime

    import_onnxruntime()
    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    chunk = max(1, opts.chunk)
    with tempfile.TemporaryDirectory(prefix="deltayolo-calib-") as tmp:
        calibrator = create_calibrator(
            model_path, list(op_types) or None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
            calibrate_method=cm, extra_options=dict(m_opts),
        )
        calibrator.set_execution_providers(["CPUExecutionProvider"])
        started = time.monotonic()
        for i in range(0, len(frames), chunk):
            with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints per pass
                calibrator.collect_data(_Reader(input_name, frames[i : i + chunk], input_hw, opts.max_pixels))
            done = min(i + chunk, len(frames))
            if done == len(frames) or done % (chunk * 10) == 0:
                log.info("calibration (%s): %d/%d frames, %.0f s", method, done, len(frames),
                         time.monotonic() - started)
        with contextlib.redirect_stdout(io.StringIO()):
            data = calibrator.compute_data()
    return {name: (float(np.min(td.range_value[0])), float(np.max(td.range_value[1])))
            for name, td in data.items()}


def _quantize(
    model_path: Path, out: Path, ranges: dict[str, tuple[float, float]], method: Method, spec: _TargetSpec,
    kept: Sequence[str], opts: CalibrationOptions,
) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import (
        CalibrationMethod,
        TensorData,
        TensorsData,
        save_tensors_data,
    )

    cm = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
          "entropy": CalibrationMethod.Entropy}[method]
    data = {k: TensorData(lowest=np.array(lo, dtype=np.float32), highest=np.array(hi, dtype=np.float32))
            for k, (lo, hi) in ranges.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deltayolo-quant-") as tmp:
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(TensorsData(cm, data), cache)
        quiet = logging.getLogger()  # quantize_static warns on the root logger about pre-processing
        level = quiet.level
        quiet.setLevel(max(level, logging.ERROR))
        try:
            quantize_static(
                str(model_path), str(out), None,
                quant_format=getattr(QuantFormat, spec.quant_format),
                op_types_to_quantize=list(spec.op_types) or None,
                per_channel=True, reduce_range=opts.reduce_range,
                activation_type=getattr(QuantType, spec.activation_type),
                weight_type=getattr(QuantType, spec.weight_type),
                nodes_to_exclude=list(kept), calibrate_method=cm, extra_options=dict(spec.extra),
                calibration_cache_path=cache,
            )
        finally:
            quiet.setLevel(level)


def float_inputs_for_kept(proto: Any, kept: Sequence[str]) -> int:
    """Let kept (float) nodes read the float tensor, not the fake-quantized copy made for a quantized sibling.

    onnxruntime's QDQ quantizer puts one Q/DQ pair on an activation and points *every* consumer at the
    DequantizeLinear output, kept nodes too: a kept conv beside a quantized one (``/model.22/cv3.0/`` beside
    ``/model.16/`` on the same tensor) would still read int8-rounded values. Here each kept node's input that
    is an activation Q -> DQ is rewired to the Q's float input (weights, whose Q/DQ reads an initializer, are
    not touched). Returns the number of rewired inputs."""
    kept_set = set(kept)
    inits = {i.name for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    rewired = 0
    for n in proto.graph.node:
        if n.name not in kept_set:
            continue
        for i, t in enumerate(n.input):
            dq = producer.get(t)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is None or q.op_type != "QuantizeLinear" or q.input[0] in inits:
                continue
            n.input[i] = q.input[0]
            rewired += 1
    used = {t for n in proto.graph.node for t in n.input} | {o.name for o in proto.graph.output}
    dead = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            and not any(o in used for o in n.output)]
    while dead:  # Q/DQ pairs no node reads any more
        for n in dead:
            proto.graph.node.remove(n)
        used = {t for n in proto.graph.node for t in n.input} | {o.name for o in proto.graph.output}
        dead = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
    return rewired


def _finish(path: Path, meta: dict[str, Any], fast_dfl: bool, float_kept: bool = False,
            kept: Sequence[str] = ()) -> int:
    """Record how the file was made in its metadata (``deltayolo.quant``), next to the export's own; with
    ``fast_dfl``, move the DFL softmax to the last axis; with ``float_kept``, let kept nodes read float
    tensors (:func:`float_inputs_for_kept`). Returns the number of DFL rewrites."""
    import onnx

    from daemon.quant.fastdfl import rewrite_dfl

    proto = onnx.load(str(path))
    rewritten = rewrite_dfl(proto) if fast_dfl else 0
    if float_kept:
        meta = {**meta, "kept_float_inputs": float_inputs_for_kept(proto, kept)}
    props = [p for p in proto.metadata_props if p.key != "deltayolo.quant"]
    del proto.metadata_props[:]
    proto.metadata_props.extend(props)
    entry = proto.metadata_props.add()
    entry.key, entry.value = "deltayolo.quant", json.dumps(meta)
    onnx.save(proto, str(path))
    return rewritten


def quant_metadata(proto: Any) -> dict[str, Any] | None:
    """The ``deltayolo.quant`` metadata of a model made by :func:`calibrate` (None for other models)."""
    for p in proto.metadata_props:
        if p.key == "deltayolo.quant":
            value: dict[str, Any] = json.loads(p.value)
            return value
    return None


def op_counts(proto: Any, kept: Sequence[str] = ()) -> tuple[dict[str, int], dict[str, int], int]:
    """(quantized op counts, float op counts, number of Q/DQ nodes) of a quantized graph. Kept nodes are float.
    QDQ: a node is quantized when it reads a dequantized tensor. QOperator: QLinear/Integer ops, and ops passing
    8-bit tensors through (Split, MaxPool, Resize... reading a quantized op's output)."""
    nodes = list(proto.graph.node)
    qoperator = any(n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") for n in nodes)
    skip = set(kept)
    eight_bit: set[str] = set()  # QOperator: tensors holding 8-bit data
    dq_outputs: set[str] = set()
    quantized: dict[str, int] = {}
    floating: dict[str, int] = {}
    qdq = 0
    for n in nodes:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qdq += 1
            (eight_bit if n.op_type == "QuantizeLinear" else dq_outputs).update(n.output)
            continue
        if qoperator:
            is_q = n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or (
                bool(n.input) and n.input[0] in eight_bit)
            if is_q:
                eight_bit.update(n.output)
        else:
            is_q = any(t in dq_outputs for t in n.input)
        bucket = quantized if is_q and n.name not in skip else floating
        bucket[n.op_type] = bucket.get(n.op_type, 0) + 1
    return quantized, floating, qdq
