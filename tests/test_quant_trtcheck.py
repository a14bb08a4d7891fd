"""The structural TensorRT check on small hand-built Q/DQ graphs (one fault each) and on real calibrated models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from daemon.quant.trtcheck import CANNOT_CHECK, check_trt_qdq

ZERO = np.int8(0)


def _model(
    act_zp: Any = ZERO, w_zp: Any = None, w_axis: int = 0, w_scale_n: int = 4, bias: Any = None,
    act_scale: float = 0.02, q_feeds_relu: bool = False, opset: int = 19,
) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 W)) [-> + DQ(bias)] -> y; every argument spoils one thing."""
    w = np.arange(4 * 3 * 3 * 3, dtype=np.int8).reshape(4, 3, 3, 3) % 7
    inits = [
        numpy_helper.from_array(np.array(act_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.asarray(act_zp), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(np.full(w_scale_n, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(w_scale_n, np.int8) if w_zp is None else np.asarray(w_zp), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], name="dq_w", axis=w_axis),
    ]
    conv_inputs = ["x_dq", "w"]
    if bias is not None:
        inits += [numpy_helper.from_array(bias, "b_q"), numpy_helper.from_array(np.full(4, 2e-4, np.float32), "b_s")]
        nodes.append(helper.make_node("DequantizeLinear", ["b_q", "b_s"], ["b"], name="dq_b", axis=0))
        conv_inputs.append("b")
    nodes.append(helper.make_node("Conv", conv_inputs, ["y"], name="conv", pads=[1, 1, 1, 1]))
    if q_feeds_relu:
        nodes.append(helper.make_node("Relu", ["x_q"], ["r"], name="relu_on_int8"))
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_clean_symmetric_model_passes() -> None:
    r = check_trt_qdq(_model())
    assert (r.ok, r.errors, r.counts) == (True, (), {"quantize": 1, "dequantize_activation": 1,
                                                    "dequantize_weight": 1})
    assert r.cannot_check == CANNOT_CHECK


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"act_zp": np.uint8(128)}, "zero point is uint8"),
        ({"act_zp": np.int8(3)}, "zero point [3] is not 0"),
        ({"w_zp": np.array([0, 1, 0, 0], np.int8)}, "is not 0 (asymmetric)"),
        ({"w_axis": 1}, "per-channel axis 1 for Conv 'conv'; its output channels are axis 0"),
        ({"w_scale_n": 3}, "3 scales for 4 output channels"),
        ({"bias": np.zeros(4, np.int32)}, "dequantizes a int32 bias 'b_q'"),
        ({"act_scale": 0.0}, "scale must be finite, positive"),
        ({"q_feeds_relu": True}, "feeds Relu 'relu_on_int8'"),
        ({"opset": 12}, "opset 12 < 13"),
    ],
)
def test_each_fault_is_reported(kwargs: dict[str, Any], error: str) -> None:
    r = check_trt_qdq(_model(**kwargs))
    assert not r.ok
    assert any(error in e for e in r.errors), r.errors


def test_unquantized_model_fails(model_path: Path) -> None:
    r = check_trt_qdq(onnx.load(str(model_path)))
    assert r.errors == ("no QuantizeLinear node: the model is not quantized",)
