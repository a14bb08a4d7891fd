"""A structural check that TensorRT's ONNX parser would accept a Q/DQ model as explicit INT8.

Checked here, from the graph alone (no TensorRT needed):

* every QuantizeLinear/DequantizeLinear has a constant, finite, positive float scale and an explicit int8 zero
  point that is 0 everywhere (TensorRT quantizes symmetrically to int8 only; a missing zero point means uint8);
* activations are quantized per tensor (scalar scale); per-channel scales only on a DequantizeLinear of a
  constant int8 weight, with ``axis`` = the consumer's output-channel axis (Conv 0, ConvTranspose 1, Gemm 0 with
  transB=1 else 1, MatMul the last) and one scale per channel;
* a weight's DequantizeLinear feeds a weighted op (Conv, ConvTranspose, Gemm, MatMul) directly as its weight;
* no int32 (bias) or other non-int8 DequantizeLinear, no block quantization;
* every activation QuantizeLinear feeds only DequantizeLinear nodes with the same scale and zero point, and every
  DequantizeLinear of a non-constant reads a QuantizeLinear;
* no Q/DQ on shape tensors (the shape/index inputs of Reshape, Slice, Resize, Expand, Tile, Pad, Gather...);
* the opset allows per-axis Q/DQ (>= 13).

See :data:`CANNOT_CHECK` for what only a real TensorRT build shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np

from daemon.quant.report import TrtCheckResult

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
# op type -> input indices that carry shapes/indices/sizes, never data that TensorRT could quantize
SHAPE_INPUTS: dict[str, frozenset[int]] = {
    "Reshape": frozenset({1}), "Slice": frozenset({1, 2, 3, 4}), "Resize": frozenset({1, 2, 3}),
    "Expand": frozenset({1}), "Tile": frozenset({1}), "Pad": frozenset({1, 2, 3}), "Gather": frozenset({1}),
    "Unsqueeze": frozenset({1}), "Squeeze": frozenset({1}), "ConstantOfShape": frozenset({0}),
    "Range": frozenset({0, 1, 2}), "TopK": frozenset({1}), "Split": frozenset({1}),
}
CANNOT_CHECK = (
    "that this TensorRT version's ONNX parser supports every op and the opset of the graph",
    "that the build succeeds and which layers really run in INT8 (TensorRT may fall back to FP16/FP32 where no "
    "INT8 kernel or fusion exists)",
    "numeric agreement of the engine with onnxruntime's Q/DQ simulation (fusions may requantize differently)",
    "speed of the engine, and optimization profiles for dynamic batch",
)
INT8 = 3  # onnx.TensorProto.INT8
_FLOATS = {1, 10, 16}  # FLOAT, FLOAT16, BFLOAT16


def check_trt_qdq(model: Any) -> TrtCheckResult:
    """Check an ``onnx.ModelProto`` (see the module docstring); errors make ``ok`` false."""
    from onnx import numpy_helper

    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    inits.update(_constant_nodes(g.node, numpy_helper))
    consumers: dict[str, list[tuple[Any, int]]] = {}
    for n in g.node:
        for idx, t in enumerate(n.input):
            consumers.setdefault(t, []).append((n, idx))
    producer = {o: n for n in g.node for o in n.output}
    errors: list[str] = []
    warnings: list[str] = []
    counts: Counter[str] = Counter()
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        errors.append(f"opset {opset} < 13: per-axis QuantizeLinear/DequantizeLinear need opset 13")
    for n in g.node:
        if n.domain not in ("", "ai.onnx") and n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            errors.append(f"{_who(n)}: domain {n.domain!r} (contrib Q/DQ); TensorRT parses only ONNX-domain Q/DQ")
        if n.op_type == "QuantizeLinear":
            counts["quantize"] += 1
            _check_q(n, inits, consumers, errors)
        elif n.op_type == "DequantizeLinear":
            _check_dq(n, inits, consumers, producer, errors, warnings, counts)
        elif n.op_type.startswith("QLinear") or n.op_type in ("ConvInteger", "MatMulInteger"):
            errors.append(f"{_who(n)}: QOperator op {n.op_type}; TensorRT needs the QDQ format")
    if counts["quantize"] == 0:
        errors.append("no QuantizeLinear node: the model is not quantized")
    return TrtCheckResult(ok=not errors, errors=tuple(errors), warnings=tuple(warnings), counts=dict(counts),
                          cannot_check=CANNOT_CHECK)


def _constant_nodes(nodes: Iterable[Any], numpy_helper: Any) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for n in nodes:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = numpy_helper.to_array(a.t)
    return out


def _who(n: Any) -> str:
    return f"{n.op_type} {n.name or n.output[0]!r}"


def _attr(n: Any, name: str, default: int) -> int:
    for a in n.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _scale_zp(n: Any, inits: dict[str, np.ndarray], errors: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Check scale and zero point of a Q or DQ node; returns them when both are constants."""
    if len(n.input) < 2 or n.input[1] not in inits:
        errors.append(f"{_who(n)}: scale is not a constant initializer")
        return None
    scale = inits[n.input[1]]
    if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)) or not np.all(scale > 0):
        errors.append(f"{_who(n)}: scale must be finite, positive float, got {scale.dtype} "
                      f"min {float(np.min(scale)) if scale.size else 'empty'}")
    if len(n.input) < 3 or not n.input[2]:
        # No zero point: a QuantizeLinear then outputs uint8 unless output_dtype says int8 (opset 21); a
        # DequantizeLinear takes its input's type (checked at that input's QuantizeLinear or weight).
        if n.op_type == "QuantizeLinear" and _attr(n, "output_dtype", 0) != INT8:
            errors.append(f"{_who(n)}: no zero point and no int8 output_dtype, which means uint8; TensorRT "
                          "needs int8 with zero point 0")
        return scale, np.zeros(scale.shape, np.int8)
    if n.input[2] not in inits:
        errors.append(f"{_who(n)}: zero point is not a constant initializer")
        return None
    zp = inits[n.input[2]]
    if zp.dtype != np.int8:
        errors.append(f"{_who(n)}: zero point is {zp.dtype}; TensorRT accepts int8 only (symmetric)")
    elif np.any(zp != 0):
        errors.append(f"{_who(n)}: zero point {zp.ravel()[:4].tolist()} is not 0 (asymmetric)")
    if zp.shape != scale.shape:
        errors.append(f"{_who(n)}: zero point shape {zp.shape} differs from scale shape {scale.shape}")
    if _attr(n, "block_size", 0):
        errors.append(f"{_who(n)}: block quantization (block_size {_attr(n, 'block_size', 0)}) is not INT8 in TRT")
    return scale, zp


def _check_q(n: Any, inits: dict[str, np.ndarray], consumers: dict[str, list[tuple[Any, int]]],
             errors: list[str]) -> None:
    sz = _scale_zp(n, inits, errors)
    if sz is not None and sz[0].size != 1:
        errors.append(f"{_who(n)}: per-channel activation quantization ({sz[0].size} scales); TensorRT "
                      "quantizes activations per tensor")
    for c, _idx in consumers.get(n.output[0], []):
        if c.op_type != "DequantizeLinear":
            errors.append(f"{_who(n)}: feeds {_who(c)}; a QuantizeLinear must feed DequantizeLinear only")
            continue
        if sz is None or len(c.input) < 2 or c.input[1] not in inits:
            continue
        other = inits[c.input[1]]
        other_zp = inits.get(c.input[2]) if len(c.input) > 2 else None
        if other.shape != sz[0].shape or not np.array_equal(other, sz[0]) or (
                other_zp is not None and not np.array_equal(other_zp, sz[1])):
            errors.append(f"{_who(n)} -> {_who(c)}: the pair's scales or zero points differ")


def _check_dq(
    n: Any, inits: dict[str, np.ndarray], consumers: dict[str, list[tuple[Any, int]]], producer: dict[str, Any],
    errors: list[str], warnings: list[str], counts: Counter[str],
) -> None:
    src = n.input[0]
    sz = _scale_zp(n, inits, errors)
    users = consumers.get(n.output[0], [])
    for c, idx in users:
        if idx in SHAPE_INPUTS.get(c.op_type, frozenset()):
            errors.append(f"{_who(n)}: feeds the shape/index input {idx} of {_who(c)}")
    if src not in inits:  # an activation
        counts["dequantize_activation"] += 1
        p = producer.get(src)
        if p is None or p.op_type != "QuantizeLinear":
            errors.append(f"{_who(n)}: reads {src!r} made by {_who(p) if p is not None else 'a graph input'}, "
                          "not by a QuantizeLinear")
        if sz is not None and sz[0].size != 1:
            errors.append(f"{_who(n)}: per-channel activation dequantization; TensorRT needs per tensor")
        return
    w = inits[src]
    if w.dtype != np.int8:
        kind = "bias" if w.dtype == np.int32 else "constant"
        errors.append(f"{_who(n)}: dequantizes a {w.dtype} {kind} {src!r}; TensorRT dequantizes int8 only "
                      "(keep biases in float: QuantizeBias=False)")
        return
    counts["dequantize_weight"] += 1
    if not users:
        warnings.append(f"{_who(n)}: output unused")
    for c, idx in users:
        if c.op_type not in WEIGHTED_OPS or idx != 1:
            errors.append(f"{_who(n)}: weight {src!r} feeds input {idx} of {_who(c)}; a weight's "
                          "DequantizeLinear must feed a Conv/ConvTranspose/Gemm/MatMul weight directly")
            continue
        if sz is not None:
            _check_weight_axis(n, c, w, sz[0], errors)


def _check_weight_axis(dq: Any, consumer: Any, w: np.ndarray, scale: np.ndarray, errors: list[str]) -> None:
    if scale.size == 1:
        return  # per-tensor weights are allowed
    if consumer.op_type == "Conv":
        want = 0
    elif consumer.op_type == "ConvTranspose":
        want = 1
    elif consumer.op_type == "Gemm":
        want = 0 if _attr(consumer, "transB", 0) else 1
    else:  # MatMul: the output features are the last axis of the weight
        want = w.ndim - 1
    axis = _attr(dq, "axis", 1)
    axis = axis + w.ndim if axis < 0 else axis
    if axis != want:
        errors.append(f"{_who(dq)}: per-channel axis {axis} for {_who(consumer)}; its output channels are "
                      f"axis {want}")
    elif scale.ndim != 1 or scale.size != w.shape[want]:
        errors.append(f"{_who(dq)}: {scale.size} scales for {w.shape[want]} output channels of {_who(consumer)}")
