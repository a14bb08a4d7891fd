"""Calibration on the real yolov8n with a handful of real frames (tiny, for speed), and the entropy pitfall on a
tiny synthetic model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.inference.model import load_model
from daemon.quant.calibrate import (
    CalibrationOptions,
    calibrate,
    compute_ranges,
    float_inputs_for_kept,
    quant_metadata,
)
from daemon.quant.frames import SourceFrame, load_frames
from daemon.quant.trtcheck import check_trt_qdq


@pytest.fixture(scope="module")
def few_frames(vtest_path: Path) -> list[SourceFrame]:
    return load_frames(f"{vtest_path}@0:300:100")


def test_tensorrt_target(model_path: Path, few_frames: list[SourceFrame], tmp_path: Path) -> None:
    out = tmp_path / "m.int8.onnx"
    ranges = tmp_path / "ranges.json"
    r = calibrate(model_path, few_frames, "minmax", "tensorrt", ("decode",), out,
                  CalibrationOptions(ranges_path=ranges))
    assert (r.quant_format, r.activation_type, r.weight_type, r.symmetric_activations) == (
        "QDQ", "QInt8", "QInt8", True)
    assert r.trt_check is not None and r.trt_check.ok, r.trt_check
    assert len(r.kept_nodes) == 24 and "/model.22/Concat_3" in r.kept_nodes
    assert r.quantized_ops["Conv"] == 63  # 64 convs less the DFL one, kept in the decode
    assert r.size_ratio < 0.35  # head convolutions quantized too
    assert r.frame_count == 3 and r.frame_digests == tuple(f.digest for f in few_frames)
    saved = json.loads(out.with_suffix(".calib.json").read_text())
    assert saved["size_ratio"] == round(r.size_ratio, 4) and saved["trt_check"]["ok"] is True
    meta = quant_metadata(onnx.load(str(out)))
    assert meta is not None and meta["frames"] == list(r.frame_digests) and meta["target"] == "tensorrt"
    loaded = load_model(out)  # the export's metadata (class names) survives
    assert loaded.class_names[:2] == ("person", "bicycle") and loaded.layout == "anchors_last"
    # a second keep set reuses the ranges instead of calibrating again
    r2 = calibrate(model_path, few_frames, "minmax", "tensorrt", ("head",), tmp_path / "h.onnx",
                   CalibrationOptions(ranges_path=ranges))
    assert len(r2.kept_nodes) == 66 and r2.size_ratio > r.size_ratio
    # the default keep set (stride <= 8 part, /model.6/, /model.7/, /model.9/ and the decode): under half the size,
    # TensorRT-shaped, and the kept convs beside quantized ones read float tensors
    r3 = calibrate(model_path, few_frames, "minmax", "tensorrt", None, tmp_path / "d.onnx",
                   CalibrationOptions(ranges_path=ranges))
    assert r3.keep == ("decode", "stride8", "/model.6/", "/model.7/", "/model.9/")
    assert 0.45 < r3.size_ratio < 0.5 and r3.trt_check is not None and r3.trt_check.ok, r3.trt_check
    meta3 = quant_metadata(onnx.load(str(tmp_path / "d.onnx")))
    assert meta3 is not None and meta3["kept_float_inputs"] >= 2


def test_cpu_target_is_u8s8_and_not_for_tensorrt(model_path: Path, few_frames: list[SourceFrame],
                                                 tmp_path: Path) -> None:
    out = tmp_path / "c.onnx"
    r = calibrate(model_path, few_frames[:2], "minmax", "cpu", None, out, CalibrationOptions(cpu_format="qoperator"))
    assert (r.quant_format, r.activation_type, r.weight_type) == ("QOperator", "QUInt8", "QInt8")
    assert r.quantized_ops["QLinearConv"] == 63 and r.trt_check is None
    assert r.float_ops.get("Concat") == 4  # the decode's concats stay float
    assert r.float_ops.get("MatMul") == 1 and "DFL softmax moved" in r.notes[0]  # fast DFL on the cpu target
    assert r.keep == ("decode",)  # the cpu target's default keep
    check = check_trt_qdq(onnx.load(str(out)))
    assert not check.ok and any("QOperator op QLinearConv" in e for e in check.errors)


def _tiny_model(path: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["images", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Mul", ["c", "c"], ["y"], name="square")]  # heavy right tail
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                            [1, 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 32, 32])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_entropy_pitfall(tmp_path: Path, few_frames: list[SourceFrame]) -> None:
    """onnxruntime's default entropy bins (128/128) give exactly the MinMax ranges; 2048/128 really searches."""
    model = tmp_path / "tiny.onnx"
    _tiny_model(model)
    opts = CalibrationOptions()

    def ranges(method: str, m_opts: dict[str, float | int | bool | str]) -> dict[str, tuple[float, float]]:
        return compute_ranges(model, few_frames, "images", (32, 32), method, (), m_opts, opts)  # type: ignore[arg-type]

    minmax = ranges("minmax", {"symmetric": False})
    default_entropy = ranges("entropy", {"num_bins": 128, "num_quantized_bins": 128})
    real_entropy = ranges("entropy", {"num_bins": 2048, "num_quantized_bins": 128})
    assert default_entropy["y"] == pytest.approx(minmax["y"], rel=1e-6)
    assert real_entropy["y"][1] < 0.8 * minmax["y"][1]


def test_kept_node_reads_the_float_tensor_not_its_quantized_copy() -> None:
    """x -> Q -> DQ feeds a quantized conv A and a kept conv B: B is rewired to x; the weights' DQ is left."""
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8), "w_q")
    inits = [w, numpy_helper.from_array(np.array(0.1, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "z"),
             numpy_helper.from_array(np.ones((1, 1, 1, 1), np.float32), "w_f")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w_q", "s", "z"], ["wd"], name="wdq"),
        helper.make_node("Conv", ["xd", "wd"], ["a"], name="A"),
        helper.make_node("Conv", ["xd", "w_f"], ["b"], name="B"),
    ]
    vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 4, 4]) for n in ("x", "a", "b")]
    model = helper.make_model(helper.make_graph(nodes, "g", [vi[0]], vi[1:], inits))
    assert float_inputs_for_kept(model, ["B"]) == 1
    by_name = {n.name: n for n in model.graph.node}
    assert list(by_name["B"].input) == ["x", "w_f"] and list(by_name["A"].input) == ["xd", "wd"]
    assert float_inputs_for_kept(model, ["A", "B"]) == 1  # A's activation rewired; its weight DQ stays
    assert list(by_name["A"].input) == ["x", "wd"]
    assert {n.name for n in model.graph.node} == {"wdq", "A", "B"}  # the unused activation Q/DQ are dropped
