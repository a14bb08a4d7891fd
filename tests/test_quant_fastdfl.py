"""The DFL softmax rewrite gives the same outputs as the export's graph, on a real frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from daemon.inference.onnxrt import make_session
from daemon.quant.fastdfl import rewrite_dfl
from daemon.quant.frames import load_frames, prepare


def test_rewrite_keeps_outputs(model_path: Path, bus_path: Path) -> None:
    proto = onnx.load(str(model_path))
    assert rewrite_dfl(proto) == 1
    ops = {n.name: n.op_type for n in proto.graph.node}
    assert ops["/model.22/dfl/conv/Conv_as_matmul"] == "MatMul" and "/model.22/dfl/conv/Conv" not in ops
    assert rewrite_dfl(proto) == 0  # nothing left to rewrite
    x = prepare(load_frames(str(bus_path))[0], (640, 640)).tensor[None]
    before = make_session(model_path.read_bytes(), threads=1).run(None, {"images": x})[0]
    after = make_session(proto.SerializeToString(), threads=1).run(None, {"images": x})[0]
    assert np.abs(before - after).max() < 1e-4
