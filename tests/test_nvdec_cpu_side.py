"""The CPU side of NVDEC decoding (no GPU needed): video packet frames and their validation, AvSource's packet
mode (Annex-B out of raw H.264 and of MP4's length-prefixed packets, every packet forwarded, fps-capped ones marked
decode-only, other codecs still decoded to pixels), the per-camera decoder state (keyframes, lost packets, format
changes) driven through a fake decoder, the NVDEC choice and its fallback when PyNvVideoCodec is missing, and the
config/camera wiring. The GPU side: tests/test_gpu_nvdec.py."""

from __future__ import annotations

import importlib.util
import logging
from fractions import Fraction
from pathlib import Path
from typing import Any, ClassVar

import av
import numpy as np
import pytest
from test_sources_replay import Collect, wait_for

from daemon.cameras import build_source, video_packets
from daemon.config.model import CameraConfig, ModelConfig
from daemon.gpu.nvdec import MAX_PENDING, NvdecPool, choose_video, nvdec_status
from daemon.sources.av import AvSource, annexb_start, has_parameter_sets
from daemon.types import Frame, VideoPacket

FIXTURE = Path(__file__).parent / "data" / "vtest30.h264"
SPS, PPS, IDR, P = b"\x00\x00\x00\x01\x67", b"\x00\x00\x00\x01\x68", b"\x00\x00\x00\x01\x65", b"\x00\x00\x00\x01\x41"


def _pkt(data: bytes = P + b"\x00", key: bool = False, codec: str = "h264", w: int = 64, h: int = 48,
         decode_only: bool = False) -> VideoPacket:
    return VideoPacket(codec, data, key, w, h, decode_only)


def _frame(seq: int, key: bool = False, cam: str = "c", **kw: Any) -> Frame:
    return Frame(cam, seq, 0.0, 0.0, packet=_pkt(key=key, **kw))


# -- types -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"codec": "mpeg4"}, "codec must be one of h264, hevc, got 'mpeg4'"),
    ({"data": b""}, "video packet is empty"),
    ({"w": 0}, "size must be positive, got 0x48"),
])
def test_video_packet_is_validated(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _pkt(**kwargs)


def test_packet_frame_carries_nothing_else_and_counts_its_bytes() -> None:
    with pytest.raises(ValueError, match="a video packet frame carries no jpeg/pixels"):
        Frame("c", 1, 0.0, 0.0, jpeg=b"\xff\xd8", packet=_pkt())
    f = Frame("c", 1, 0.0, 0.0, packet=_pkt(P + b"abc"))
    assert f.bytes_in == 8 and f.jpeg is None and f.pixels is None


@pytest.mark.parametrize(("codec", "data", "want"), [
    ("h264", b"\x00\x00\x00\x01\x09\x10" + SPS + b"\x64", True),
    ("h264", b"\x00\x00\x01\x67\x64", True),
    ("h264", b"\x00\x00\x00\x01\x09\x10" + IDR + b"\x88", False),
    ("hevc", b"\x00\x00\x00\x01\x40\x01\x0c", True),  # VPS (type 32)
    ("hevc", b"\x00\x00\x00\x01\x42\x01\x01", True),  # SPS (type 33)
    ("hevc", b"\x00\x00\x00\x01\x26\x01\xaf", False),  # IDR_W_RADL (type 19)
    ("h264", b"", False),
])
def test_parameter_sets_are_found_in_band(codec: str, data: bytes, want: bool) -> None:
    assert has_parameter_sets(codec, data) is want


def test_annexb_start_codes() -> None:
    assert annexb_start(b"\x00\x00\x01\x67") and annexb_start(SPS)
    assert not annexb_start(b"\x01\x64\x00\x1f") and not annexb_start(b"")


# -- AvSource packet mode ----------------------------------------------------------------------------------
def _read(path: Path, **kw: Any) -> Collect:
    sink = Collect()
    src = AvSource("cam", str(path), sink, **kw)
    src.start()
    assert wait_for(lambda: not src.alive, 20.0)
    assert len(sink.ends) == 1 and sink.ends[0].reason.startswith("end of")
    return sink


def _decode_annexb(chunks: list[bytes]) -> list[np.ndarray]:
    """Each chunk fed as one packet to libavcodec's H.264 decoder (as NVDEC gets them), then flushed."""
    ctx = av.CodecContext.create("h264", "r")
    out = []
    for chunk in chunks:
        out += [f.to_ndarray(format="gray") for f in ctx.decode(av.Packet(chunk))]
    out += [f.to_ndarray(format="gray") for f in ctx.decode(None)]
    return out


def test_raw_h264_file_goes_on_as_annexb_packets(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="daemon.sources.av"):
        sink = _read(FIXTURE, packets=True, realtime=False, loop=False)
    frames = sink.frames
    assert [f.seq for f in frames] == list(range(30))
    assert all(f.packet is not None and f.pixels is None and f.jpeg is None for f in frames)
    pk = [f.packet for f in frames if f.packet is not None]
    assert {(p.codec, p.width, p.height) for p in pk} == {("h264", 768, 576)}
    assert [p.key for p in pk] == [True] + [False] * 29 and not any(p.decode_only for p in pk)
    assert all(p.data.startswith(b"\x00\x00\x00\x01\x09") for p in pk)  # in band SPS: nothing prepended
    assert b"".join(p.data for p in pk) == FIXTURE.read_bytes()
    assert "h264 768x576 packets go to the GPU decoder (NVDEC)" in caplog.text


def test_mp4_packets_become_annexb_and_decode_to_the_same_frames(tmp_path: Path) -> None:
    if "libx264" not in av.codecs_available:
        pytest.skip("this FFmpeg has no libx264")
    path = tmp_path / "b.mp4"
    with av.open(str(path), mode="w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt, st.time_base = 96, 64, "yuv420p", Fraction(1, 25)
        st.options = {"preset": "ultrafast", "bf": "2", "g": "10"}  # B-frames: decode order != display order
        for i in range(20):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, (4 * i) % 96 :] = 40 + 9 * i
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    pk = [f.packet for f in _read(path, packets=True, realtime=False, loop=False).frames if f.packet is not None]
    assert len(pk) == 20 and pk[0].key and sum(p.key for p in pk) == 2
    assert all(annexb_start(p.data) for p in pk)
    assert has_parameter_sets("h264", pk[0].data)  # the filter put avcC's SPS/PPS before the keyframe
    with av.open(str(path)) as c:
        want = [f.to_ndarray(format="gray") for f in c.decode(video=0)]
    got = _decode_annexb([p.data for p in pk])
    assert len(got) == len(want) == 20
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_fps_cap_marks_packets_decode_only_instead_of_dropping_them() -> None:
    sink = _read(FIXTURE, packets=True, realtime=False, loop=False, max_fps=0.5)
    pk = [f.packet for f in sink.frames if f.packet is not None]
    assert len(pk) == 30  # an inter-coded stream needs every packet decoded
    assert not pk[0].decode_only and sum(not p.decode_only for p in pk) <= 2


def test_other_codecs_are_still_decoded_on_the_cpu(vtest_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = Collect()
    src = AvSource("cam", str(vtest_path), sink, packets=True, realtime=False, loop=False)
    with caplog.at_level(logging.INFO, logger="daemon.sources.av"):
        src.start()
        assert wait_for(lambda: len(sink.frames) >= 3, 20.0)
        src.stop(5.0)
    assert all(f.pixels is not None and f.packet is None for f in sink.frames)
    assert "codec msmpeg4 is not h264/hevc: decoded on the CPU" in caplog.text


def test_without_packets_h264_is_decoded_to_pixels_as_before() -> None:
    frames = _read(FIXTURE, realtime=False, loop=False).frames
    assert len(frames) == 30 and all(f.pixels is not None and f.pixels.shape == (576, 768, 3) for f in frames)


# -- per-camera decoder state, through a fake decoder ---------------------------------------------------------
class FakeDecoder:
    """Gives back a picture for every packet fed (the pts it was fed with), as a (h * 3 / 2, w) array like NVDEC's;
    a packet holding b"HOLD" comes out only with the next one (reordering), b"BAD" raises like NVDEC does."""

    made: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, codec: str, device: int, stream_ptr: int) -> None:
        self.stream_ptr = stream_ptr
        self._held: list[int] = []
        FakeDecoder.made.append((codec, stream_ptr))

    def decode(self, data: bytes, pts: int) -> list[tuple[int, Any]]:
        if b"BAD" in data:
            raise RuntimeError("cuvidParseVideoData failed")
        self._held.append(pts)
        if b"HOLD" in data:
            return []
        out, self._held = self._held, []
        return [(p, np.zeros((72, 64), np.uint8)) for p in out]

    def flush(self) -> list[tuple[int, Any]]:
        return []


class _Stream:
    ptr = 1234


@pytest.fixture
def pool() -> NvdecPool:
    FakeDecoder.made = []
    return NvdecPool(0, factory=FakeDecoder, stream=_Stream())


def test_pictures_come_back_with_their_frames(pool: NvdecPool) -> None:
    frames = [_frame(0, key=True), _frame(1), _frame(2, decode_only=True)]
    got = []
    for f in frames:
        pics, errs = pool.decode(f)
        assert not errs
        got += pics
    assert [p.frame for p in got] == frames  # decode-only ones too: the preparer gives them no row
    assert {(p.width, p.height) for p in got} == {(64, 48)}
    assert FakeDecoder.made == [("h264", 1234)] and len(pool) == 1


def test_a_stream_starts_at_a_keyframe(pool: NvdecPool) -> None:
    pics, errs = pool.decode(_frame(0))
    assert not pics and [e.kind for e in errs] == ["corrupt"]
    assert "skipped until the next keyframe: the stream has not reached a keyframe yet" in errs[0].message
    assert not FakeDecoder.made
    pics, errs = pool.decode(_frame(1, key=True))
    assert [p.frame.seq for p in pics] == [1] and not errs


def test_lost_packets_wait_for_the_next_keyframe(pool: NvdecPool) -> None:
    pool.decode(_frame(0, key=True))
    pool.decode(_frame(1))
    pics, errs = pool.decode(_frame(4))  # 2 and 3 were dropped by the queue
    assert not pics and "frames were lost before it" in errs[0].message
    pics, errs = pool.decode(_frame(5))
    assert not pics and len(errs) == 1
    pics, errs = pool.decode(_frame(6, key=True))
    assert [p.frame.seq for p in pics] == [6] and not errs
    assert len(FakeDecoder.made) == 1  # same format: the decoder stays


def test_frames_the_fps_cap_keeps_from_inference_publish_no_errors_while_waiting(pool: NvdecPool) -> None:
    """decode_only packets are decoded for the stream's sake only: waiting for a keyframe costs no error for them,
    but still one for each frame that was to be inferred."""
    pics, errs = pool.decode(_frame(0, decode_only=True))
    assert not pics and not errs
    pics, errs = pool.decode(_frame(1))
    assert not pics and len(errs) == 1
    pics, errs = pool.decode(_frame(2, key=True, decode_only=True))
    assert [p.frame.seq for p in pics] == [2] and not errs  # decoded (the preparer gives it no row)


def test_a_format_change_makes_a_new_decoder(pool: NvdecPool) -> None:
    pool.decode(_frame(0, key=True))
    pics, _ = pool.decode(_frame(1, key=True, codec="hevc", w=128, h=96))
    assert [p.frame.seq for p in pics] == [1]
    assert [c for c, _ in FakeDecoder.made] == ["h264", "hevc"]


def test_rejected_packets_are_errors_and_the_stream_waits_for_a_keyframe(pool: NvdecPool) -> None:
    pool.decode(_frame(0, key=True))
    bad = Frame("c", 1, 0.0, 0.0, packet=_pkt(P + b"BAD"))
    pics, errs = pool.decode(bad)
    assert not pics and errs[0].kind == "corrupt" and "NVDEC rejected the packet" in errs[0].message
    pics, errs = pool.decode(_frame(2))
    assert not pics and "keyframe" in errs[0].message


def test_packets_without_a_picture_are_reported_once_too_many_wait(pool: NvdecPool) -> None:
    pool.decode(_frame(0, key=True))
    held = [Frame("c", s, 0.0, 0.0, packet=_pkt(P + b"HOLD")) for s in range(1, MAX_PENDING + 3)]
    errs_all = []
    for f in held:
        pics, errs = pool.decode(f)
        assert not pics
        errs_all += errs
    assert [(e.seq, e.kind) for e in errs_all] == [(1, "empty"), (2, "empty")]
    assert "the decoder gave no picture for this packet" in errs_all[0].message


def test_forget_drops_a_cameras_decoder(pool: NvdecPool) -> None:
    pool.decode(_frame(0, key=True, cam="a"))
    pool.decode(_frame(0, key=True, cam="b"))
    assert len(pool) == 2
    pool.forget("a")
    assert len(pool) == 1
    pics, errs = pool.decode(_frame(1, cam="a"))  # a new decoder again needs a keyframe
    assert not pics and errs
    pool.close()
    assert len(pool) == 0


# -- choice, fallback, config, wiring ------------------------------------------------------------------------
def test_nvdec_status_says_why_not_without_pynvvideocodec() -> None:
    if importlib.util.find_spec("PyNvVideoCodec") is not None:
        pytest.skip("PyNvVideoCodec is installed here")
    ok, why = nvdec_status()
    assert not ok
    assert why == "PyNvVideoCodec is not installed (pip install pynvvideocodec): H.264/H.265 decoded on the CPU"


@pytest.mark.parametrize(("wanted", "status", "want"), [
    ("auto", (True, "NVDEC"), (True, "NVDEC")),
    ("auto", (False, "not installed: CPU"), (False, "not installed: CPU")),
    ("cpu", (True, "NVDEC"), (False, "gpu_video_decoder cpu: H.264/H.265 decoded by PyAV on the CPU")),
    ("nvdec", (True, "NVDEC"), (True, "NVDEC")),
])
def test_choose_video(wanted: str, status: tuple[bool, str], want: tuple[bool, str]) -> None:
    assert choose_video(wanted, status) == want


def test_nvdec_asked_for_but_missing_refuses_to_start() -> None:
    with pytest.raises(RuntimeError, match="gpu_video_decoder nvdec asked for, but PyNvVideoCodec is not installed"):
        choose_video("nvdec", (False, "PyNvVideoCodec is not installed (pip install pynvvideocodec): CPU"))


def test_config_has_gpu_video_decoder() -> None:
    assert ModelConfig().gpu_video_decoder == "auto"
    assert ModelConfig.model_validate({"gpu_video_decoder": "cpu"}).gpu_video_decoder == "cpu"
    with pytest.raises(ValueError, match="gpu_video_decoder"):
        ModelConfig.model_validate({"gpu_video_decoder": "dali"})


def _cam(source: dict[str, Any], **extra: Any) -> CameraConfig:
    return CameraConfig.model_validate({"id": "c1", "source": source, **extra})


def test_which_cameras_hand_packets_to_the_gpu() -> None:
    file = {"type": "file", "path": str(FIXTURE)}
    rtsp = {"type": "rtsp", "url": "rtsp://127.0.0.1:1/x"}
    assert video_packets(_cam(file), True) and video_packets(_cam(rtsp), True)
    assert not video_packets(_cam(file), False)
    assert not video_packets(_cam(file, roi=[0, 0, 100, 100]), True)
    assert not video_packets(_cam(file, mask=[[[0, 0], [10, 0], [0, 10]]]), True)
    assert not video_packets(_cam({"type": "replay", "path": str(FIXTURE)}), True)


def test_build_source_passes_packet_mode_to_av_sources() -> None:
    sink = Collect()
    on = build_source(_cam({"type": "file", "path": str(FIXTURE)}), sink, gpu_video=True)
    off = build_source(_cam({"type": "file", "path": str(FIXTURE)}), sink)
    assert isinstance(on, AvSource) and isinstance(off, AvSource)
    assert on.packets and not off.packets


# -- flush at the end of a stream, new sessions: real B-frame H.264, libavcodec standing in for NVDEC -------------
class AvDecoder:
    """PyAV's H.264 decoder behind PictureDecoder, as NVDEC behaves: pictures in display order with the pts their
    packet was fed with, the ones held for reordering only out of ``flush``; NV12-shaped (h * 3 / 2, w) arrays."""

    made: ClassVar[int] = 0

    def __init__(self, codec: str, device: int, stream_ptr: int) -> None:
        self.stream_ptr = stream_ptr
        self._ctx = av.CodecContext.create(codec, "r")
        AvDecoder.made += 1

    def _out(self, frames: list[Any]) -> list[tuple[int, Any]]:
        return [(int(f.pts), f.to_ndarray(format="nv12")) for f in frames]

    def decode(self, data: bytes, pts: int) -> list[tuple[int, Any]]:
        pkt = av.Packet(data)
        pkt.pts = pts
        return self._out(self._ctx.decode(pkt))

    def flush(self) -> list[tuple[int, Any]]:
        return self._out(self._ctx.decode(None))


def _bframes_mp4(path: Path, n: int = 20) -> list[np.ndarray]:
    """An MP4 with B-frames (keyframes every 10); its pictures' luma as libavcodec decodes them, in display order."""
    if "libx264" not in av.codecs_available:
        pytest.skip("this FFmpeg has no libx264")
    with av.open(str(path), mode="w") as out:
        st = out.add_stream("libx264", rate=25)
        st.width, st.height, st.pix_fmt, st.time_base = 96, 64, "yuv420p", Fraction(1, 25)
        st.options = {"preset": "ultrafast", "bf": "3", "g": "10", "b_strategy": "0"}
        for i in range(n):
            img = np.zeros((64, 96, 3), np.uint8)
            img[:, (4 * i) % 96 :] = 40 + 7 * i
            for p in st.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="nv12")[:64] for f in c.decode(video=0)]


def _feed(pool: NvdecPool, frames: list[Frame]) -> tuple[list[Any], list[Any]]:
    pictures, errors = [], []
    for f in frames:
        pics, errs = pool.decode(f)
        pictures += pics
        errors += errs
    return pictures, errors


def test_flush_at_end_of_stream_gives_every_last_picture_in_order(tmp_path: Path) -> None:
    want = _bframes_mp4(tmp_path / "b.mp4")
    frames = _read(tmp_path / "b.mp4", packets=True, realtime=False, loop=False).frames
    assert frames[0].packet is not None and frames[0].packet.new_session
    assert not any(f.packet is not None and f.packet.new_session for f in frames[1:])
    pool = NvdecPool(0, factory=AvDecoder, stream=_Stream())
    pictures, errors = _feed(pool, frames)
    assert not errors and len(pictures) < len(want)  # B-frames: the decoder still holds the last ones
    held = {f.seq for f in frames} - {p.frame.seq for p in pictures}
    flushed, errors = pool.flush("cam")
    assert not errors and {p.frame.seq for p in flushed} == held
    pictures += flushed
    assert sorted(p.frame.seq for p in pictures) == [f.seq for f in frames]  # each frame exactly one picture
    assert [p.frame.seq for p in pictures] != sorted(p.frame.seq for p in pictures)  # display order != decode order
    got = [np.asarray(p.nv12)[: p.height] for p in pictures]
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert pool.flush("cam") == ([], []) and pool.flush("other") == ([], [])


def test_a_flushed_camera_starts_again_at_a_keyframe_with_a_new_decoder(tmp_path: Path) -> None:
    _bframes_mp4(tmp_path / "b.mp4")
    frames = _read(tmp_path / "b.mp4", packets=True, realtime=False, loop=False).frames
    AvDecoder.made = 0
    pool = NvdecPool(0, factory=AvDecoder, stream=_Stream())
    _feed(pool, frames[:5])
    pool.flush("cam")
    pics, errs = pool.decode(Frame("cam", 5, 0.0, 0.0, packet=frames[5].packet))
    assert not pics and "keyframe" in errs[0].message
    assert AvDecoder.made == 1


def _mid_gop_h264(tmp_path: Path) -> tuple[Path, int]:
    """A B-frame H.264 stream remuxed (parameter sets out of band, as RTSP's SDP carries them) from its 4th packet
    on: it starts on a P/B-frame, as an RTSP session joined mid-GOP does; the packets before its first keyframe."""
    _bframes_mp4(tmp_path / "b.mp4", n=30)
    path = tmp_path / "mid.mkv"
    with av.open(str(tmp_path / "b.mp4")) as c, av.open(str(path), "w") as out:
        st = c.streams.video[0]
        ost = out.add_stream_from_template(st)
        pk = [p for p in c.demux(st) if p.size]
        assert [i for i, p in enumerate(pk) if p.is_keyframe][:2] == [0, 10]
        for p in pk[3:]:
            p.stream = ost
            out.mux(p)
    return path, 10 - 3


def test_a_session_that_starts_mid_gop_drops_packets_until_a_keyframe(tmp_path: Path) -> None:
    path, before = _mid_gop_h264(tmp_path)
    sink = Collect()
    src = AvSource("cam", str(path), sink, packets=True, realtime=False, loop=False)
    src.start()
    assert wait_for(lambda: not src.alive, 20.0)
    pk = [f.packet for f in sink.frames if f.packet is not None]
    assert src.skipped_before_key == before
    assert pk[0].key and pk[0].new_session and len(pk) == 30 - 3 - before
    assert [f.seq for f in sink.frames] == list(range(len(pk)))  # dropped before numbering: no seq gap


def test_a_new_session_flushes_the_old_decoder_and_starts_a_new_one(tmp_path: Path) -> None:
    """Two sessions (a file looped: the same as an RTSP reconnect here): the first session's held pictures come
    out at the second session's keyframe, before its pictures; the second decoder never sees the first's
    references."""
    path, _ = _mid_gop_h264(tmp_path)
    sink = Collect()
    src = AvSource("cam", str(path), sink, packets=True, realtime=False, loop=True)
    src.start()
    assert wait_for(lambda: sum(1 for f in sink.frames if f.packet and f.packet.new_session) >= 3, 20.0)
    src.stop(5.0)
    frames = sink.frames
    starts = [i for i, f in enumerate(frames) if f.packet is not None and f.packet.new_session]
    one, two = frames[starts[0] : starts[1]], frames[starts[1] : starts[2]]
    AvDecoder.made = 0
    pool = NvdecPool(0, factory=AvDecoder, stream=_Stream())
    first, errors = _feed(pool, one)
    assert not errors
    second, errors = _feed(pool, two)
    assert not errors and AvDecoder.made == 2
    seqs = [p.frame.seq for p in first + second]
    assert len(set(seqs)) == len(seqs) and {f.seq for f in one} <= set(seqs)  # session one: every picture, once
    assert set(seqs) - {f.seq for f in one} <= {f.seq for f in two}
    assert {p.frame.seq for p in second[: len(one) - len(first)]} == {f.seq for f in one} - {p.frame.seq
                                                                                            for p in first}
    # the two sessions' pictures are the same pictures: the second decoder started clean at the keyframe
    a = [np.asarray(p.nv12) for p in first + second if p.frame.seq in {f.seq for f in one}]
    b = [np.asarray(p.nv12) for p in second if p.frame.seq in {f.seq for f in two}]
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=False))
