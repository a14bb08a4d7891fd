"""Which nodes of a YOLO graph stay in floating point when the rest is quantized.

The Ultralytics detection head (the last ``/model.N/`` block) has per-scale convolution branches (box: cv2,
classes: cv3) and a decode tail that joins the scales: DFL softmax/conv, anchor arithmetic, the sigmoid of the
class logits and the final concat of 0-640 box coordinates with 0-1 scores. Quantizing that concat under one
int8 scale zeroes every score, so the decode tail must stay in float.

Found from the graph, not from names alone: the head's *entry tensors* are the tensors it reads from outside;
a head node depending on one entry tensor is per-scale, on several is past the join. *Branch* nodes are the
per-scale convolutions and everything feeding them inside the head; *decode* is the rest of the head; the
*last convs* are the branch convolutions no other branch convolution follows.

Keep specs (``--keep``): a preset (``decode``, ``decode+last-convs``, ``head``, ``input-conv``, ``stride8``,
``none``), an exact node name, or a name prefix ending in ``/`` (``/model.22/cv3.0/``: the class branch of the
first scale). ``input-conv`` is the convolution reading the image: symmetric int8 (TensorRT) quantizes its [0, 1]
input with 128 levels, half the resolution of the 8-bit pixels (``stride8``, in the tensorrt default, holds it).
``stride8`` is every node whose output has a stride of 8 or less against the input image (found by following
Conv/MaxPool strides and Resize scales through the graph): the high-resolution layers, which hold under a tenth
of yolov8n's weights (+0.07x file size in float) and whose INT8 error moves small and near-threshold scores the
most (per-block sensitivity in docs/int8-results.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

PRESETS = ("decode", "decode+last-convs", "head", "input-conv", "stride8", "none")
# tensorrt: the smallest measured set that keeps every class with >= 50 reference objects at AP50 >= 0.97 on the
# held-out vtest frames (0.494x the FP32 file); /model.6/, /model.7/ and /model.9/ (a C2f at stride 16, the
# stride-32 down conv, SPPF) are the backbone blocks the per-block sensitivity ranks next after the stride-8 part.
# Prefixes absent from a model match nothing and are an error: pass --keep for other architectures.
# cpu: only the decode (speed: every other op stays 8-bit; keeping blocks costs speed and did not help bird).
DEFAULT_KEEP: dict[str, tuple[str, ...]] = {
    "tensorrt": ("decode", "stride8", "/model.6/", "/model.7/", "/model.9/"),
    "cpu": ("decode",),
}
_BLOCK = re.compile(r"^(/model\.\d+/)")


class KeepError(ValueError):
    """A keep spec names nothing in the model, or the model's head cannot be found."""


@dataclass(frozen=True, slots=True)
class HeadParts:
    """The detection head of a graph, split as described in the module docstring (node names, graph order)."""

    prefix: str
    head: tuple[str, ...]
    branch: tuple[str, ...]
    last_convs: tuple[str, ...]
    decode: tuple[str, ...]
    entries: tuple[str, ...]


def find_head(graph: Any) -> HeadParts:
    """Split the head of an Ultralytics-style graph (``onnx.GraphProto``, topologically sorted)."""
    nodes = list(graph.node)
    producer = {out: n for n in nodes for out in n.output}
    outputs = [o.name for o in graph.output]
    last = producer.get(outputs[0]) if outputs else None
    m = _BLOCK.match(last.name) if last is not None else None
    if m is None:
        raise KeepError(f"cannot find the detection head: the output {outputs[:1]} is not made by a "
                        "'/model.N/...' node (not an Ultralytics export?); name the nodes to keep instead")
    prefix = m.group(1)
    head = [n for n in nodes if n.name.startswith(prefix)]
    names = {n.name for n in head}
    scales: dict[str, frozenset[str]] = {}  # tensor -> entry tensors it depends on
    entries: list[str] = []
    for n in head:
        dep: set[str] = set()
        for t in n.input:
            if not t:
                continue
            p = producer.get(t)
            if p is not None and p.name in names:
                dep |= scales.get(t, frozenset())
            elif p is not None:  # made outside the head: an entry tensor
                dep.add(t)
                if t not in entries:
                    entries.append(t)
        for out in n.output:
            scales[out] = frozenset(dep)
    per_scale_convs = [n for n in head if n.op_type == "Conv" and len(scales[n.output[0]]) == 1]
    branch = _ancestors_within(per_scale_convs, producer, names)
    conv_names = {n.name for n in per_scale_convs}
    last_convs = [n.name for n in per_scale_convs if not (_descendants(n, head) & conv_names)]
    return HeadParts(
        prefix=prefix,
        head=tuple(n.name for n in head),
        branch=tuple(n.name for n in head if n.name in branch),
        last_convs=tuple(last_convs),
        decode=tuple(n.name for n in head if n.name not in branch),
        entries=tuple(entries),
    )


def _ancestors_within(seeds: Sequence[Any], producer: dict[str, Any], names: set[str]) -> set[str]:
    """Names of ``seeds`` and of every head node they (transitively) read from."""
    out: set[str] = set()
    stack = list(seeds)
    while stack:
        n = stack.pop()
        if n.name in out:
            continue
        out.add(n.name)
        stack.extend(p for t in n.input if (p := producer.get(t)) is not None and p.name in names)
    return out


def _descendants(node: Any, head: Sequence[Any]) -> set[str]:
    """Names of the head nodes that (transitively) read ``node``'s outputs."""
    reached = set(node.output)
    out: set[str] = set()
    for n in head:  # graph order is topological
        if n.name != node.name and any(t in reached for t in n.input):
            out.add(n.name)
            reached.update(n.output)
    return out


def _input_convs(graph: Any) -> list[str]:
    inits = {i.name for i in graph.initializer}
    inputs = {i.name for i in graph.input if i.name not in inits}
    found = [n.name for n in graph.node if n.op_type == "Conv" and n.input[0] in inputs]
    if not found:
        raise KeepError("--keep input-conv: no Conv reads a graph input directly")
    return found


def strides(graph: Any) -> dict[str, float]:
    """Stride (input pixels per element) of every tensor computed from the image input, following Conv and
    MaxPool ``strides`` and Resize/Upsample scales; other ops take the largest stride of their inputs."""
    from onnx import numpy_helper

    consts: dict[str, Any] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    inits = {i.name for i in graph.initializer}
    out: dict[str, float] = {i.name: 1.0 for i in graph.input if i.name not in inits}
    for n in graph.node:
        seen = [out[t] for t in n.input if t in out]
        if not seen:
            continue
        s = max(seen)
        if n.op_type in ("Conv", "MaxPool", "AveragePool"):
            st = next((list(a.ints) for a in n.attribute if a.name == "strides"), [1])
            s *= float(st[0]) if st else 1.0
        elif n.op_type in ("Resize", "Upsample"):
            scales = consts.get(n.input[2] if n.op_type == "Resize" and len(n.input) > 2 else n.input[-1])
            if scales is not None and getattr(scales, "size", 0) == 4 and float(scales[2]) > 0:
                s /= float(scales[2])
        for o in n.output:
            out[o] = s
    return out


def _stride8(graph: Any) -> list[str]:
    st = strides(graph)
    return [n.name for n in graph.node if n.output and n.output[0] in st and st[n.output[0]] <= 8.0]


def resolve_keep(graph: Any, keep: Iterable[str]) -> tuple[str, ...]:
    """Node names to keep in float for the given specs, in graph order. Raises KeepError for a spec that
    matches no node (naming it and the presets)."""
    specs = list(keep)
    all_names = [n.name for n in graph.node]
    chosen: set[str] = set()
    parts: HeadParts | None = None
    for spec in specs:
        if spec in PRESETS:
            if spec == "none":
                continue
            if spec == "input-conv":
                chosen.update(_input_convs(graph))
                continue
            if spec == "stride8":
                chosen.update(_stride8(graph))
                continue
            parts = parts or find_head(graph)
            if spec == "head":
                chosen.update(parts.head)
            else:
                chosen.update(parts.decode)
                if spec == "decode+last-convs":
                    chosen.update(parts.last_convs)
            continue
        matched = [n for n in all_names if n == spec or (spec.endswith("/") and n.startswith(spec))]
        if not matched:
            raise KeepError(f"--keep {spec!r} matches no node: give a preset ({', '.join(PRESETS)}), "
                            "an exact node name, or a name prefix ending in '/'")
        chosen.update(matched)
    return tuple(n for n in all_names if n in chosen)
