"""H.264 decoded on the GPU by NVDEC (PyNvVideoCodec) on a CUDA GPU: pictures bit-exact with libavcodec, the NV12
letterbox kernel within a few levels of the CPU path (swscale BT.601 + cv2 letterbox), detections matching the CPU
path, the preparer's packet rows, and decode throughput printed. Needs CuPy, PyNvVideoCodec, OpenCV with FFmpeg
(the CPU reference decode of the fixture) and onnxruntime (CPU is enough); no PyAV: the packets are the access
units of tests/data/vtest30.h264 (tools/make_h264_fixture.py). CPU-side parts: tests/test_nvdec_cpu_side.py."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from daemon.decode.letterbox import letterbox_into
from daemon.inference.model import LoadedModel, load_model
from daemon.inference.onnxrt import OnnxRuntimeEngine
from daemon.inference.yolo import decode_output
from daemon.types import Frame, VideoPacket

pytestmark = pytest.mark.gpu

FIXTURE = Path(__file__).parent / "data" / "vtest30.h264"
W, H = 768, 576
# md5s of frames 0, 1, 2 and 29 (Y plane, UV plane) as libavcodec decodes the fixture: NVDEC must be bit-exact
_HASHES = json.loads(FIXTURE.with_suffix(".h264.md5.json").read_text())["frames"]
EXPECTED = {int(k): (v[0], v[1]) for k, v in _HASHES.items()}


@pytest.fixture(scope="module", autouse=True)
def _nvdec() -> None:
    from daemon.gpu.nvdec import nvdec_status

    ok, why = nvdec_status()
    if not ok:
        pytest.skip(why)


def access_units(data: bytes) -> list[bytes]:
    """The fixture's access units (it has an access unit delimiter, 00 00 00 01 09, before each picture)."""
    marks = []
    i = data.find(b"\x00\x00\x00\x01\x09")
    while i >= 0:
        marks.append(i)
        i = data.find(b"\x00\x00\x00\x01\x09", i + 5)
    return [data[a:b] for a, b in zip(marks, [*marks[1:], len(data)], strict=True)]


def packet_frames(camera: str = "cam0", first_seq: int = 0) -> list[Frame]:
    aus = access_units(FIXTURE.read_bytes())
    return [Frame(camera, first_seq + i, 0.0, 0.0, packet=VideoPacket("h264", au, i == 0, W, H))
            for i, au in enumerate(aus)]


def cpu_frames() -> list[np.ndarray]:
    """The fixture decoded on the CPU by OpenCV's FFmpeg (swscale to BGR, as the CPU path's PyAV does)."""
    cap = cv2.VideoCapture(str(FIXTURE))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        out.append(np.asarray(img))
    cap.release()
    assert len(out) == 30
    return out


def gpu_rows(dtype: Any = np.float32, size: int = 640) -> tuple[np.ndarray, list[int]]:
    """Every fixture picture NVDEC-decoded and letterboxed by the NV12 kernel, on the host; and their seqs."""
    import cupy

    from daemon.gpu.nv12_kernel import Nv12Letterbox
    from daemon.gpu.nvdec import NvdecPool

    frames = packet_frames()
    pool, kernel = NvdecPool(0), Nv12Letterbox(dtype)
    stream = pool.stream
    out = cupy.zeros((len(frames), 3, size, size), dtype)
    seqs: list[int] = []
    for f in frames:
        pictures, errors = pool.decode(f)
        assert not errors
        for pic in pictures:
            assert (pic.width, pic.height) == (W, H)
            kernel(pic.nv12, pic.width, pic.height, out[len(seqs)], stream)
            seqs.append(pic.frame.seq)
    stream.synchronize()
    pool.close()
    return cupy.asnumpy(out[: len(seqs)]).astype(np.float32), seqs


def test_nvdec_pictures_are_bit_exact_with_libavcodec() -> None:
    import cupy

    from daemon.gpu.nvdec import NvdecPool

    pool = NvdecPool(0)
    got: dict[int, tuple[str, str]] = {}
    for f in packet_frames():
        pictures, errors = pool.decode(f)
        assert not errors
        assert len(pictures) == 1 and pictures[0].frame is f  # LOW latency + end-of-picture: one out per packet
        host = cupy.asnumpy(pictures[0].nv12, stream=pool.stream)
        pool.stream.synchronize()
        if f.seq in EXPECTED:
            got[f.seq] = (hashlib.md5(np.ascontiguousarray(host[:H]).tobytes(), usedforsecurity=False).hexdigest(),
                          hashlib.md5(np.ascontiguousarray(host[H:]).tobytes(), usedforsecurity=False).hexdigest())
    assert got == EXPECTED


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nv12_letterbox_matches_the_cpu_path(dtype: Any) -> None:
    rows, seqs = gpu_rows(dtype)
    assert seqs == list(range(30))
    cpu = cpu_frames()
    for k in (0, 1, 15, 29):
        want = np.zeros((3, 640, 640), np.float32)
        letterbox_into(cpu[k], 640, want)
        diff = np.abs(rows[k] - want) * 255
        # swscale's fixed-point BT.601 is within 2 levels of the kernel's (0.31 on average with PyAV's FFmpeg),
        # bilinear blending keeps that; FP16 adds half a level near 1.0
        print(f"\nframe {k} {np.dtype(dtype).name}: max {float(diff.max()):.2f} mean {float(diff.mean()):.3f} levels")
        assert float(diff.max()) <= 3.5, (k, float(diff.max()))
        assert float(diff.mean()) < 0.75, (k, float(diff.mean()))
        pad = np.float32(np.dtype(dtype).type(114 / 255))  # the gray band above the picture (576 -> 480 rows)
        assert np.all(rows[k][:, :80] == pad) and np.all(rows[k][:, 560:] == pad)


@pytest.fixture(scope="module")
def model(model_path: Path) -> LoadedModel:
    return load_model(model_path)


def _match(a_side: np.ndarray, b_low: np.ndarray, px: float = 2.0, score: float = 0.02, low: float = 0.3,
           low_score: float = 0.03) -> float:
    """Every box of ``a_side`` has a box of the same class within ``px`` (model input pixels) and ``score`` in
    ``b_low``: the other side's detections at a lower threshold (a box near the threshold on one side may have
    fallen just under it on the other, the pixels differing by a level or two). Boxes scored under ``low`` get
    ``low_score`` (measured on an H200: a 0.26/0.28 "bird" moved by 0.021, every other box by less). Returns the
    largest score difference seen."""
    worst = 0.0
    for c in a_side:
        d = np.abs(b_low[:, :4] - c[:4]).max(axis=1) if len(b_low) else np.array([np.inf])
        near = (d <= px) & (b_low[:, 5] == c[5]) if len(b_low) else np.zeros(0, bool)
        best = float(np.min(np.abs(b_low[near, 4] - c[4]))) if near.any() else np.inf
        assert best <= (low_score if c[4] < low else score), (c, b_low[int(np.argmin(d))] if len(b_low) else None,
                                                              float(d.min()), best)
        worst = max(worst, best)
    return worst


def test_nvdec_detections_match_the_cpu_path(model: LoadedModel) -> None:
    """Same engine (onnxruntime CPU) on both inputs, so only the decode + letterbox differ: boxes within 2 px,
    same classes, scores within 0.02 (issue 3's bar; 0.03 under a score of 0.3)."""
    rows, _ = gpu_rows(np.float32)
    cpu = cpu_frames()
    eng = OnnxRuntimeEngine(model, max_batch=1)
    boxes, worst = 0, 0.0
    for k in range(0, 30, 3):
        want = np.zeros((1, 3, 640, 640), np.float32)
        letterbox_into(cpu[k], 640, want[0])
        raw_c, raw_g = eng.infer(want), eng.infer(rows[k : k + 1])
        c, c_low = (decode_output(raw_c, model.layout, t, 0.7)[0] for t in (0.25, 0.15))
        g, g_low = (decode_output(raw_g, model.layout, t, 0.7)[0] for t in (0.25, 0.15))
        worst = max(worst, _match(c, g_low), _match(g, c_low))
        boxes += len(c)
    print(f"\nNVDEC vs CPU path: {boxes} CPU boxes on 10 frames, largest score difference {worst:.4f}")
    assert boxes >= 10  # vtest shows several people in every frame


class _NoJpeg:
    """The preparer's JPEG decoder, unused by packet frames (only its size and dtype are read)."""

    size = 640
    dtype = np.float32

    def decode_into(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no JPEG in this test")


def test_preparer_decodes_packets_into_rows_and_counts_packet_bytes() -> None:
    import cupy

    from daemon.gpu.prepare import GpuPreparer

    prep = GpuPreparer(_NoJpeg(), 4096 * 4096, 1 << 22)  # type: ignore[arg-type]
    frames = packet_frames("a")
    buffer = cupy.zeros((8, 3, 640, 640), cupy.float32)
    batches = [frames[i : i + 8] for i in range(0, 30, 8)]
    got: list[int] = []
    h2d = 0
    rows, _ = gpu_rows(np.float32)
    for batch in batches:
        with cupy.cuda.Stream(non_blocking=True):
            pb = prep.prepare(batch, buffer, lambda cam: None)
            cupy.cuda.get_current_stream().synchronize()
        assert not pb.errors
        for item in pb.items:
            assert item.bytes_h2d == len(item.frame.packet.data)  # type: ignore[union-attr]
            h2d += item.bytes_h2d
            np.testing.assert_array_equal(cupy.asnumpy(buffer[item.slot]), rows[item.frame.seq])
            got.append(item.frame.seq)
    assert got == list(range(30))
    assert prep.bytes_h2d == h2d == FIXTURE.stat().st_size
    # a lost packet: the camera's next packets are refused until a keyframe, with an error each
    more = packet_frames("a", first_seq=100)
    pb = prep.prepare([more[1], more[2]], buffer, lambda cam: None)
    assert not pb.items and len(pb.errors) == 2 and "keyframe" in pb.errors[0].message
    pb = prep.prepare([more[0]], buffer, lambda cam: None)
    assert [i.frame.seq for i in pb.items] == [100]
    prep.close()


def _feed(pool: Any, kernel: Any, out: Any, aus: list[bytes], cams: int, loops: int, seq: int) -> tuple[int, int]:
    """``loops`` times the fixture's access units, interleaved over ``cams`` cameras; (pictures, next seq)."""
    n = 0
    for _ in range(loops):
        for i, au in enumerate(aus):
            for c in range(cams):
                f = Frame(f"c{c}", seq, 0.0, 0.0, packet=VideoPacket("h264", au, i == 0, W, H))
                pictures, _errors = pool.decode(f)
                for pic in pictures:
                    kernel(pic.nv12, pic.width, pic.height, out, pool.stream)
                    n += 1
            seq += 1
    return n, seq


@pytest.mark.parametrize("low_latency", [True, False])
def test_nvdec_decode_throughput(low_latency: bool) -> None:
    """Decode + NV12 letterbox (FP16, 640) of the fixture for 1 and 8 cameras, decoders warmed up first; pictures/s
    printed. low_latency: a picture out of every decode call (the daemon's default); else NVDEC's native
    pipelining (pictures come out later)."""
    import cupy

    from daemon.gpu.nv12_kernel import Nv12Letterbox
    from daemon.gpu.nvdec import NvdecPool

    kernel = Nv12Letterbox(np.float16)
    out = cupy.zeros((3, 640, 640), cupy.float16)
    aus = access_units(FIXTURE.read_bytes())
    results = {}
    for cams in (1, 8):
        pool = NvdecPool(0, low_latency=low_latency)
        _, seq = _feed(pool, kernel, out, aus, cams, 1, 0)
        pool.stream.synchronize()
        t0 = time.perf_counter()
        n, _ = _feed(pool, kernel, out, aus, cams, 20 if cams == 1 else 6, seq)
        pool.stream.synchronize()
        dt = time.perf_counter() - t0
        results[cams] = n / dt
        pool.close()
        print(f"\nNVDEC decode + NV12 letterbox (FP16 640), low_latency={low_latency}, {cams} camera(s): {n} pictures "
              f"in {dt:.2f} s = {n / dt:.0f} pictures/s ({cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()})")
    assert results[1] > 200


def _bframe_packets(tmp_path: Path) -> tuple[list[Frame], list[np.ndarray]]:
    """A small B-frame H.264 MP4 made with PyAV, as AvSource forwards it; libavcodec's luma planes, display order."""
    from test_nvdec_cpu_side import _bframes_mp4, _read

    want = _bframes_mp4(tmp_path / "b.mp4")
    return _read(tmp_path / "b.mp4", packets=True, realtime=False, loop=False).frames, want


def test_nvdec_flush_gives_the_b_frame_files_last_pictures(tmp_path: Path) -> None:
    import cupy

    from daemon.gpu.nvdec import NvdecPool

    frames, want = _bframe_packets(tmp_path)
    pool = NvdecPool(0)
    got: list[tuple[int, np.ndarray]] = []
    for f in frames:
        pictures, errors = pool.decode(f)
        assert not errors
        got += [(p.frame.seq, cupy.asnumpy(p.nv12[: p.height], stream=pool.stream)) for p in pictures]
    pictures, errors = pool.flush("cam")
    assert not errors and pictures  # B-frames: NVDEC held the last ones
    got += [(p.frame.seq, cupy.asnumpy(p.nv12[: p.height], stream=pool.stream)) for p in pictures]
    pool.stream.synchronize()
    assert sorted(s for s, _ in got) == [f.seq for f in frames]
    assert all(np.array_equal(a, b) for (_, a), b in zip(got, want, strict=True))  # display order, bit-exact
    pool.close()


def test_preparer_owes_flushed_pictures_to_the_next_batch(tmp_path: Path) -> None:
    """Two-row batches: the end of stream's flush gives more pictures than rows; they come in the next prepare
    calls (``owed``), every frame once."""
    import cupy

    from daemon.gpu.prepare import GpuPreparer
    from daemon.types import EndOfStream

    frames, _ = _bframe_packets(tmp_path)
    prep = GpuPreparer(_NoJpeg(), 4096 * 4096, 1 << 22)  # type: ignore[arg-type]
    buffer = cupy.zeros((2, 3, 640, 640), cupy.float32)
    seqs: list[int] = []
    for i in range(0, len(frames), 2):
        last = i + 2 >= len(frames)
        pb = prep.prepare(frames[i : i + 2], buffer, lambda cam: None, (EndOfStream("cam", "end"),) if last else ())
        seqs += [it.frame.seq for it in pb.items]
        assert not pb.errors
    assert pb.owed > 0
    while pb.owed:
        pb = prep.prepare((), buffer, lambda cam: None)
        seqs += [it.frame.seq for it in pb.items]
    assert sorted(seqs) == [f.seq for f in frames]
    prep.close()
