"""Move the DFL softmax of an Ultralytics head to the last axis, for onnxruntime on the CPU.

The export computes the box distributions as ``Reshape(1,4,16,N) -> Transpose(0,2,1,3) -> Softmax(axis=1) ->
Conv(16->1, 1x1, weights 0..15)``. onnxruntime's CPU softmax over a non-last axis transposes internally and
took ~3.7 ms of a ~20 ms INT8 yolov8n run here. The same arithmetic as ``Transpose(0,1,3,2) -> Softmax(-1) ->
MatMul(16x1)`` gives identical outputs (max abs difference 0.0 measured) at a fraction of the cost.
Found by structure, not by names; a graph without the pattern (or with Q/DQ inside it) is left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _attr(node: Any, name: str) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a
    return None


def rewrite_dfl(proto: Any) -> int:
    """Rewrite every DFL pattern in ``proto`` (an ``onnx.ModelProto``, changed in place); returns how many."""
    from onnx import helper, numpy_helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    inits = {i.name: i for i in g.initializer}
    done = 0
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        axis, tr = _attr(sm, "axis"), producer.get(sm.input[0])
        users = consumers.get(sm.output[0], [])
        if axis is None or axis.i != 1 or tr is None or tr.op_type != "Transpose" or len(users) != 1:
            continue
        perm, conv = _attr(tr, "perm"), users[0]
        if perm is None or list(perm.ints) != [0, 2, 1, 3] or conv.op_type != "Conv" or len(conv.input) != 2:
            continue
        w = inits.get(conv.input[1])
        if w is None or len(consumers.get(tr.output[0], [])) != 1:
            continue
        weight = numpy_helper.to_array(w)
        if weight.ndim != 4 or weight.shape[0] != 1 or weight.shape[2:] != (1, 1):
            continue
        proj = f"{conv.name or conv.output[0]}/proj"
        g.initializer.append(numpy_helper.from_array(weight.reshape(-1, 1).astype(np.float32), proj))
        perm.ints[:] = [0, 1, 3, 2]
        axis.i = -1
        mm = helper.make_node("MatMul", [sm.output[0], proj], [conv.output[0]], name=f"{conv.name}_as_matmul")
        idx = list(g.node).index(conv)
        g.node.remove(conv)
        g.node.insert(idx, mm)
        if not any(w.name in n.input for n in g.node):
            g.initializer.remove(w)
        stale = {tr.output[0], sm.output[0], conv.output[0]}
        keep = [v for v in g.value_info if v.name not in stale]
        del g.value_info[:]
        g.value_info.extend(keep)
        done += 1
        log.info("DFL softmax of %s moved to the last axis", sm.name)
    return done
