"""The feature-delta codec on real YOLOv8n feature maps of vtest frames: round trips, byte counts, the closed
loop with refreshes, and malformed messages."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from daemon.decode.jpeg import decode_jpeg
from daemon.decode.letterbox import letterbox_into
from daemon.features import codec
from daemon.features.engine import FeatureDeltaRunner
from daemon.features.split import split_model
from daemon.inference.model import load_model
from daemon.sources.replay import load_jpeg_frames

Maps = list[np.ndarray]


@pytest.fixture(scope="module")
def sequence(model_path: Path, vtest_path: Path) -> list[Maps]:
    """Backbone maps (local cut) of vtest frames 0..9."""
    runner = FeatureDeltaRunner(split_model(load_model(model_path)), threads=2)
    x = np.zeros((10, 3, 640, 640), np.float32)
    for i, jpeg in enumerate(load_jpeg_frames(vtest_path, limit=10)):
        letterbox_into(decode_jpeg(jpeg, 40_000_000), 640, x[i])
    return runner.full(x)[1]


STRIDES = (8, 16, 32)


def _expected_size(header: codec.DeltaHeader) -> int:
    size = codec.HEADER.size
    for p in header.tensors:
        size += codec.TENSOR.size
        if p.cells:
            mask = 0 if header.refresh or p.cells == p.height * p.width else (p.height * p.width + 7) // 8
            size += mask + 4 * p.channels + p.cells * p.channels
    return size


def test_delta_round_trip_and_byte_count(sequence: list[Maps]) -> None:
    ref, cur = sequence[0], sequence[5]
    msg = codec.encode(ref, cur, 0.25, strides=STRIDES, seq=6, base=5)
    header, out = codec.decode(ref, msg)
    assert (header.seq, header.base, header.refresh, header.dtype) == (6, 5, False, "int8")
    assert [p.stride for p in header.tensors] == list(STRIDES)
    assert len(msg) == _expected_size(header)
    for r, c, o, part in zip(ref, cur, out, header.tensors, strict=True):
        sent = np.abs(c - r).max(axis=0) > 0.25
        assert part.cells == int(sent.sum()) > 0
        assert np.array_equal(o[:, ~sent], r[:, ~sent])  # unsent cells keep the reference
        step = np.abs(c - r)[:, sent].max(axis=1) / 127  # per-channel INT8 step
        assert np.all(np.abs(o - c)[:, sent].max(axis=1) <= step / 2 + 1e-5)
    shapes = [(int(c.shape[0]), int(c.shape[1]), int(c.shape[2])) for c in cur]
    assert len(msg) < codec.refresh_size(shapes)  # re-encoded JPEG noise moves many cells of a full recompute


def test_spliced_region_costs_its_cells(sequence: list[Maps]) -> None:
    """Features mode changes only the spliced cells: the delta is about their INT8 bytes plus the masks."""
    ref = sequence[0]
    cur = [m.copy() for m in ref]
    for m, new, s in zip(cur, sequence[5], STRIDES, strict=True):
        k = 32 // s
        m[:, 6 * k : 12 * k, 8 * k : 12 * k] = new[:, 6 * k : 12 * k, 8 * k : 12 * k]  # 128 x 192 input pixels
    msg = codec.encode(ref, cur, 0.25, strides=STRIDES)
    header = codec.read_header(msg)
    cells = [p.cells for p in header.tensors]
    assert 0 < cells[0] <= 16 * 24 and cells[2] <= 4 * 6
    values = sum(p.cells * p.channels for p in header.tensors)
    masks = sum((p.height * p.width + 7) // 8 for p in header.tensors)
    assert len(msg) == _expected_size(header) <= values + masks + 4 * (64 + 128 + 256) + 100
    assert len(msg) < 0.03 * sum(int(c.nbytes) for c in cur)


def test_refresh_round_trip_and_size(sequence: list[Maps]) -> None:
    cur = sequence[3]
    msg = codec.encode_refresh(cur, strides=STRIDES, seq=4)
    shapes = [(int(c.shape[0]), int(c.shape[1]), int(c.shape[2])) for c in cur]
    assert len(msg) == codec.refresh_size(shapes) == _expected_size(codec.read_header(msg))
    assert len(msg) < 0.26 * sum(int(c.nbytes) for c in cur)
    header, out = codec.decode(None, msg)
    assert header.refresh and header.base == header.seq == 4
    for o, c in zip(out, cur, strict=True):
        assert np.all(np.abs(o - c) <= np.abs(c).max(axis=(1, 2), keepdims=True) / 254 + 1e-5)


def test_float16_values(sequence: list[Maps]) -> None:
    ref, cur = sequence[0], sequence[2]
    msg = codec.encode(ref, cur, 0.1, dtype="float16", per_channel=False)
    header, out = codec.decode(ref, msg)
    assert header.dtype == "float16"
    for r, c, o in zip(ref, cur, out, strict=True):
        sent = np.abs(c - r).max(axis=0) > 0.1
        assert np.allclose(o[:, sent], c[:, sent], atol=5e-3)


def test_no_change_is_a_header(sequence: list[Maps]) -> None:
    msg = codec.encode(sequence[1], sequence[1], 0.0)
    assert len(msg) == codec.HEADER.size + 3 * codec.TENSOR.size
    assert all(p.cells == 0 for p in codec.read_header(msg).tensors)


def test_closed_loop_with_refresh(sequence: list[Maps]) -> None:
    enc = codec.FeatureDeltaEncoder(0.25, STRIDES, refresh_every=4)
    dec = codec.FeatureDeltaDecoder()
    sizes = []
    for maps in sequence:
        msg = enc.encode(maps)
        sizes.append(len(msg))
        got = dec.apply(msg)
        assert enc.mirror is not None
        for g, m, true in zip(got, enc.mirror, maps, strict=True):
            assert np.array_equal(g, m)  # the mirror is exactly the receiver's state
            assert float(np.abs(g - true).max()) <= 0.25 + 0.05  # drift stays bounded by the threshold
    assert enc.stats.refreshes == 3  # messages 1, 5, 9
    assert enc.stats.messages == 10 and enc.stats.bytes == sum(sizes)
    assert sizes[1] < sizes[0]  # full recomputes of a re-encoded video: JPEG noise reaches many cells
    assert 0 < enc.stats.cells_sent < enc.stats.cells_total


def test_receiver_that_missed_a_message_waits_for_a_refresh(sequence: list[Maps]) -> None:
    enc = codec.FeatureDeltaEncoder(0.25, STRIDES, refresh_every=10)
    dec = codec.FeatureDeltaDecoder()
    dec.apply(enc.encode(sequence[0]))
    enc.encode(sequence[1])  # lost
    with pytest.raises(codec.CodecError, match="applies to state 2"):
        dec.apply(enc.encode(sequence[2]))
    late = codec.FeatureDeltaDecoder()
    with pytest.raises(codec.CodecError, match="refresh"):
        late.apply(enc.encode(sequence[3]))  # message 4: a delta
    dec.apply(enc.encode(sequence[4], force_refresh=True))
    assert dec.seq == 5


def test_malformed_messages_are_rejected(sequence: list[Maps]) -> None:
    msg = codec.encode(sequence[0], sequence[4], 0.25)
    with pytest.raises(codec.CodecError, match="magic"):
        codec.read_header(b"XXXX" + msg[4:])
    with pytest.raises(codec.CodecError, match="version"):
        codec.read_header(msg[:4] + struct.pack("<H", 9) + msg[6:])
    with pytest.raises(codec.CodecError, match=r"needs|truncated"):
        codec.read_header(msg[:-10])
    with pytest.raises(codec.CodecError, match="after its last tensor"):
        codec.read_header(msg + b"\0")
    with pytest.raises(codec.CodecError, match="shorter"):
        codec.read_header(msg[:10])
    with pytest.raises(codec.CodecError, match="differ"):
        codec.encode(sequence[0][:2], sequence[1], 0.1)
