"""Camera state export/import on real data: a camera moved through bytes goes on exactly like one that stayed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.delta.policy import CameraDeltaState, Rect
from daemon.delta.signature import luma_signature
from daemon.features import state as st
from daemon.features.engine import FeatureDeltaRunner
from daemon.features.split import split_model
from daemon.inference.model import load_model
from daemon.inference.yolo import decode_output, to_detections
from daemon.sources.replay import load_jpeg_frames
from daemon.types import Letterbox


@pytest.fixture(scope="module")
def setup(model_path: Path, vtest_path: Path) -> tuple[FeatureDeltaRunner, np.ndarray, Letterbox, st.CameraState]:
    model = load_model(model_path)
    runner = FeatureDeltaRunner(split_model(model), threads=2)
    x = np.zeros((2, 3, 640, 640), np.float32)
    jpegs = load_jpeg_frames(vtest_path, limit=4)
    images = [decode_jpeg(jpegs[i], 40_000_000) for i in (0, 3)]
    lb = letterbox_into(images[0], 640, x[0])
    letterbox_into(images[1], 640, x[1])
    raw, maps = runner.full(x[:1])
    dets = to_detections(decode_output(raw, model.layout, 0.25, 0.7)[0], lb, model.class_names)
    state = st.CameraState(
        camera="cam3", signature=luma_signature(images[0], lb, 640), features=tuple(maps[0]), detections=dets,
        policy=CameraDeltaState(True, 7, 100.0 - 0.7, 12), noise_floor=2.5, last_inferred=99.9, now=100.0,
        model_sha256=model.sha256, taps=tuple(t.name for t in runner.split.taps),
    )
    return runner, x, lb, state


def test_round_trip_through_bytes(setup: tuple[FeatureDeltaRunner, np.ndarray, Letterbox, st.CameraState]) -> None:
    state = setup[3]
    data = st.to_bytes(state)
    assert data[:4] == b"DYCS"
    assert len(data) < state.nbytes + 64 * 4 + 20_000  # raw arrays plus a small JSON header
    back = st.from_bytes(data, now=5000.0)
    assert back.camera == "cam3" and back.taps == state.taps and back.model_sha256 == state.model_sha256
    assert back.signature is not None and state.signature is not None
    assert np.array_equal(back.signature, state.signature)
    for a, b in zip(back.features, state.features, strict=True):
        assert a.dtype == np.float32 and np.array_equal(a, b)
        assert a.flags.writeable  # the importer splices into them
    assert back.detections == state.detections and len(back.detections) >= 3
    assert back.policy.frames_since_key == 7 and back.policy.drift_tiles == 12 and back.policy.has_reference
    assert back.policy.key_time == pytest.approx(5000.0 - 0.7)  # ages survive, clock values do not
    assert back.last_inferred == pytest.approx(5000.0 - 0.1)
    assert back.noise_floor == 2.5
    st.check_compatible(back, state.model_sha256, state.taps, [tuple(f.shape) for f in state.features])


def test_moved_camera_continues_like_one_that_stayed(
        setup: tuple[FeatureDeltaRunner, np.ndarray, Letterbox, st.CameraState]) -> None:
    runner, x, _, state = setup
    moved = st.from_bytes(st.to_bytes(state), now=0.0)
    stayed = [f.copy() for f in state.features]
    region = [Rect(224, 192, 416, 416)]
    a = runner.regions(x[1], stayed, region)
    b = runner.regions(x[1], list(moved.features), region)
    assert np.array_equal(a.raw, b.raw)


def test_pack_keeps_one_blob(setup: tuple[FeatureDeltaRunner, np.ndarray, Letterbox, st.CameraState]) -> None:
    _, _, _, state = setup
    head, blob = st.pack(state)
    assert isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.size % st.ALIGN == 0
    back = st.unpack(head, blob, now=100.0)
    assert np.shares_memory(back.features[0], blob)  # views: one copy moves the whole state
    assert np.array_equal(back.features[2], state.features[2])


def test_malformed_state_is_rejected(setup: tuple[FeatureDeltaRunner, np.ndarray, Letterbox, st.CameraState]) -> None:
    _, _, _, state = setup
    data = st.to_bytes(state)
    with pytest.raises(st.StateError, match="magic"):
        st.from_bytes(b"NOPE" + data[4:], now=0.0)
    with pytest.raises(st.StateError, match="version"):
        st.from_bytes(data[:4] + struct.pack("<H", 7) + data[6:], now=0.0)
    with pytest.raises(st.StateError, match="header says"):
        st.from_bytes(data[:-1], now=0.0)
    hlen = st.HEADER.size + st.HEADER.unpack_from(data)[3]
    meta = json.loads(data[st.HEADER.size : hlen])
    meta["arrays"][1]["dtype"] = "|O"
    text = json.dumps(meta).encode()
    bad = st.HEADER.pack(st.MAGIC, st.VERSION, 0, len(text), len(data) - hlen) + text + data[hlen:]
    with pytest.raises(st.StateError, match="not allowed"):
        st.from_bytes(bad, now=0.0)
    with pytest.raises(st.StateError, match=r"runs"):
        st.check_compatible(state, "f" * 64, state.taps, [tuple(f.shape) for f in state.features])
    with pytest.raises(st.StateError, match="shapes"):
        st.check_compatible(state, state.model_sha256, state.taps, [(1, 1, 1)] * 3)
