"""Probe PyNvVideoCodec (NVDEC) on a GPU machine: API facts the daemon's NVDEC path relies on.

Usage: python3 tools/nvdec_probe.py OUTFILE

Needs only PyNvVideoCodec, cupy and numpy (no PyAV): it feeds tests/data/vtest30.h264 (30 vtest frames, 768x576,
H.264 Annex-B with one access unit delimiter per frame, made by tools/make_h264_fixture.py) to the core decoder one
access unit at a time, and writes what it sees to OUTFILE (and stdout). Every section is guarded: a failing one
prints its traceback and the probe goes on.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "data" / "vtest30.h264"
WIDTH, HEIGHT = 768, 576
# md5s of frames 0, 1, 2 and 29 (Y plane, UV plane) as libavcodec decodes the fixture: NVDEC must be bit-exact
_HASHES = json.loads(FIXTURE.with_suffix(".h264.md5.json").read_text())["frames"]
EXPECTED = {int(k): (v[0], v[1]) for k, v in _HASHES.items()}

_out = io.StringIO()


def say(*parts: object) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    _out.write(line + "\n")


def section(name: str, fn: Callable[[], object]) -> object:
    say(f"\n== {name}")
    try:
        return fn()
    except BaseException as exc:  # a probe: report everything and go on
        say(f"!! {type(exc).__name__}: {exc}")
        say(traceback.format_exc())
        return None


def access_units(data: bytes) -> list[bytes]:
    """Split an Annex-B stream at its access unit delimiters (00 00 00 01 09)."""
    marks = []
    i = data.find(b"\x00\x00\x00\x01\x09")
    while i >= 0:
        marks.append(i)
        i = data.find(b"\x00\x00\x00\x01\x09", i + 5)
    marks.append(len(data))
    return [data[a:b] for a, b in itertools.pairwise(marks)]


def public(obj: Any) -> list[str]:
    return [n for n in dir(obj) if not n.startswith("__")]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    outfile = Path(argv[1])
    try:
        run()
    finally:
        outfile.parent.mkdir(parents=True, exist_ok=True)
        outfile.write_text(_out.getvalue())
    return 0


def run() -> None:
    import cupy as cp
    import PyNvVideoCodec as nvc

    aus = access_units(FIXTURE.read_bytes())
    state: dict[str, Any] = {}

    def versions() -> None:
        say("python", sys.version.split()[0], "numpy", np.__version__, "cupy", cp.__version__)
        for key in ("__version__", "__cuda_version__", "__video_codec_sdk_version__"):
            say("nvc." + key, getattr(nvc, key, "<absent>"))
        dev = cp.cuda.Device(0)
        say("device", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "cc", dev.compute_capability)
        say("fixture", FIXTURE, FIXTURE.stat().st_size, "bytes,", len(aus), "access units, first sizes",
            [len(a) for a in aus[:4]])

    def api() -> None:
        say("nvc public names:", public(nvc))
        for name in ("PacketData", "cudaVideoCodec", "OutputColorType", "Pixel_Format", "DisplayDecodeLatencyType",
                     "cudaVideoSurfaceFormat", "cudaVideoChromaFormat"):
            obj = getattr(nvc, name, None)
            say(f"{name}:", "<absent>" if obj is None else public(obj))
        for name in ("CreateDecoder", "PacketData"):
            obj = getattr(nvc, name, None)
            if obj is not None:
                say(f"--- {name}.__doc__:\n{obj.__doc__}")
        pkt = nvc.PacketData()
        say("PacketData() fields:", {k: getattr(pkt, k) for k in public(pkt) if not callable(getattr(pkt, k))})

    def decoder_kwargs(**extra: Any) -> dict[str, Any]:
        kw: dict[str, Any] = {"gpuid": 0, "codec": nvc.cudaVideoCodec.H264, "cudacontext": 0, "cudastream": 0,
                              "usedevicememory": True}
        kw.update(extra)
        return kw

    def packet(data: Any, pts: int = 0) -> Any:
        buf = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data
        pkt = nvc.PacketData()
        pkt.bsl_data = int(buf.ctypes.data)
        pkt.bsl = int(buf.size)
        pkt.pts = pts
        return pkt, buf

    def flush_packet() -> Any:
        pkt = nvc.PacketData()
        pkt.bsl_data = 0
        pkt.bsl = 0
        return pkt

    def decode_default() -> None:
        dec = nvc.CreateDecoder(**decoder_kwargs())
        say("decoder:", type(dec).__name__, public(dec))
        per_packet = []
        first: Any = None
        for i, au in enumerate(aus):
            pkt, _buf = packet(au, pts=1000 + i)
            frames = dec.Decode(pkt)
            per_packet.append(len(frames))
            if frames and first is None:
                first = frames[0]
                describe(first)
                check_planes(first, 0, "default")
        tail = dec.Decode(flush_packet())
        say("frames per packet (default latency):", per_packet, "flush returned", len(tail))
        for k in ("GetWidth", "GetHeight", "GetFrameSize", "GetPixelFormat", "GetNumDecodedFrame",
                  "GetSessionInitTime"):
            fn = getattr(dec, k, None)
            if fn is not None:
                try:
                    say(f"dec.{k}() =", fn())
                except BaseException as exc:
                    say(f"dec.{k}() raised {type(exc).__name__}: {exc}")

    def describe(frame: Any) -> None:
        say("frame repr:", repr(frame))
        say("frame public:", public(frame))
        for k in ("format", "timestamp", "shape", "strides", "dtype"):
            try:
                say(f"frame.{k} =", getattr(frame, k))
            except BaseException as exc:
                say(f"frame.{k} raised {type(exc).__name__}: {exc}")
        for k in ("framesize", "getPTS", "GetPtrToPlane", "__dlpack_device__"):
            fn = getattr(frame, k, None)
            if fn is None:
                say(f"frame.{k}: <absent>")
                continue
            try:
                say(f"frame.{k}() =", fn(0) if k == "GetPtrToPlane" else fn())
            except BaseException as exc:
                say(f"frame.{k}() raised {type(exc).__name__}: {exc}")
        say("hasattr __cuda_array_interface__:", hasattr(frame, "__cuda_array_interface__"))
        if hasattr(frame, "__cuda_array_interface__"):
            say("frame CAI:", frame.__cuda_array_interface__)
        try:
            views = frame.cuda()
            say("frame.cuda():", type(views).__name__, len(views))
            for j, v in enumerate(views):
                say(f"  plane {j} CAI:", v.__cuda_array_interface__)
        except BaseException as exc:
            say(f"frame.cuda() raised {type(exc).__name__}: {exc}")
        try:
            arr = cp.from_dlpack(frame)
            say("cp.from_dlpack(frame):", arr.shape, arr.strides, arr.dtype, "ptr", arr.data.ptr)
        except BaseException as exc:
            say(f"cp.from_dlpack raised {type(exc).__name__}: {exc}")

    def check_planes(frame: Any, index: int, tag: str) -> None:
        """Copy Y and UV to the host (cp.from_dlpack: one (h*3/2, w) NV12 array) and compare md5s."""
        arr = cp.from_dlpack(frame)
        host = cp.asnumpy(arr)
        y_host, uv_host = host[:HEIGHT, :WIDTH], host[HEIGHT:, :WIDTH]
        got = (hashlib.md5(np.ascontiguousarray(y_host).tobytes(), usedforsecurity=False).hexdigest(),
               hashlib.md5(np.ascontiguousarray(uv_host).tobytes(), usedforsecurity=False).hexdigest())
        want = EXPECTED.get(index)
        say(f"[{tag}] frame {index} dlpack {arr.shape} {arr.strides} md5 {got} ->",
            "MATCH" if want == got else f"DIFFERENT (expected {want})")

    def latency_modes() -> None:
        lat = getattr(nvc, "DisplayDecodeLatencyType", None)
        if lat is None:
            say("no DisplayDecodeLatencyType")
            return
        for mode in public(lat):
            if not mode.isupper():
                continue
            try:
                dec = nvc.CreateDecoder(**decoder_kwargs(latency=getattr(lat, mode)))
            except BaseException as exc:
                say(f"latency={mode}: CreateDecoder raised {type(exc).__name__}: {exc}")
                continue
            counts, pts_seen = [], []
            for i, au in enumerate(aus):
                pkt, _buf = packet(au, pts=1000 + i)
                frames = dec.Decode(pkt)
                counts.append(len(frames))
                pts_seen += [getattr(f, "timestamp", None) for f in frames]
            tail = dec.Decode(flush_packet())
            pts_seen += [getattr(f, "timestamp", None) for f in tail]
            say(f"latency={mode}: frames per packet {counts}, flush {len(tail)}, timestamps {pts_seen[:6]}..")
            state[f"lat_{mode}"] = sum(counts) + len(tail)

    def surface_reuse() -> None:
        """Do frames from earlier Decode calls keep their memory, or are surfaces recycled?"""
        dec = nvc.CreateDecoder(**decoder_kwargs())
        held: list[tuple[int, Any]] = []
        index = 0
        for au in aus:
            pkt, _buf = packet(au)
            for f in dec.Decode(pkt):
                held.append((index, f))
                index += 1
        for f in dec.Decode(flush_packet()):
            held.append((index, f))
            index += 1
        ptrs = [int(f.GetPtrToPlane(0)) for _, f in held]
        say("decoded", len(held), "frames, distinct plane-0 pointers:", len(set(ptrs)))
        for i, f in held:
            if i in EXPECTED:
                check_planes(f, i, "held")

    def timing() -> None:
        loops = 20
        dec = nvc.CreateDecoder(**decoder_kwargs())
        bufs = [np.frombuffer(a, np.uint8) for a in aus]
        for b in bufs:  # warm-up
            pkt, _ = packet(b)
            dec.Decode(pkt)
        dec.Decode(flush_packet())
        n = 0
        t0 = time.perf_counter()
        for _ in range(loops):
            for b in bufs:
                pkt, _ = packet(b)
                n += len(dec.Decode(pkt))
            n += len(dec.Decode(flush_packet()))
        cp.cuda.Device(0).synchronize()
        dt = time.perf_counter() - t0
        say(f"one decoder: {n} frames in {dt:.3f} s = {n / dt:.0f} frames/s (768x576 H.264, flush every 30)")
        t0 = time.perf_counter()
        dec2 = nvc.CreateDecoder(**decoder_kwargs())
        say(f"CreateDecoder took {time.perf_counter() - t0:.3f} s")
        del dec2
        decs = [nvc.CreateDecoder(**decoder_kwargs()) for _ in range(8)]
        n = 0
        t0 = time.perf_counter()
        for _ in range(loops // 2):
            for b in bufs:
                pkt, _ = packet(b)
                for d in decs:  # interleaved, as 8 cameras would feed them
                    n += len(d.Decode(pkt))
            for d in decs:
                n += len(d.Decode(flush_packet()))
        cp.cuda.Device(0).synchronize()
        dt = time.perf_counter() - t0
        say(f"8 decoders interleaved: {n} frames in {dt:.3f} s = {n / dt:.0f} frames/s")

    def with_cupy_stream() -> None:
        cp.cuda.runtime.free(0)
        ctx = cp.cuda.driver.ctxGetCurrent()
        stream = cp.cuda.Stream(non_blocking=True)
        dec = nvc.CreateDecoder(**decoder_kwargs(cudacontext=int(ctx), cudastream=int(stream.ptr)))
        got = 0
        for au in aus:
            pkt, _buf = packet(au)
            for f in dec.Decode(pkt):
                if got in EXPECTED:
                    stream.synchronize()
                    check_planes(f, got, "cupy-stream")
                got += 1
        got += len(dec.Decode(flush_packet()))
        say("cupy context", int(ctx), "stream", int(stream.ptr), "->", got, "frames")

    def hevc_and_caps() -> None:
        fn = getattr(nvc, "GetDecoderCaps", None)
        if fn is None:
            say("no GetDecoderCaps")
            return
        for codec in ("H264", "HEVC", "AV1"):
            try:
                say(codec, fn(gpuid=0, codec=getattr(nvc.cudaVideoCodec, codec),
                              chromaformat=getattr(nvc.cudaVideoChromaFormat, '420'), bitdepth=8))
            except BaseException as exc:
                say(f"GetDecoderCaps({codec}) raised {type(exc).__name__}: {exc}")

    def garbage() -> None:
        dec = nvc.CreateDecoder(**decoder_kwargs())
        junk = np.frombuffer(b"\x00\x00\x00\x01\x65" + bytes(range(256)) * 8, np.uint8)
        pkt, _buf = packet(junk)
        say("garbage packet ->", len(dec.Decode(pkt)), "frames (no exception)")
        pkt, _buf = packet(aus[1])  # a P frame before any SPS/PPS/IDR
        say("P frame first ->", len(dec.Decode(pkt)), "frames (no exception)")
        got = 0
        for au in aus:
            pkt, _buf = packet(au)
            got += len(dec.Decode(pkt))
        got += len(dec.Decode(flush_packet()))
        say("then the real stream ->", got, "frames")


    def end_of_picture() -> None:
        """decode_flag = CUVID_PKT_ENDOFPICTURE (8) with LOW / ZERO latency: a picture out of every packet?"""
        lat = nvc.DisplayDecodeLatencyType
        for mode in ("LOW", "ZERO", "NATIVE"):
            for flag in (8, 8 | 2):
                dec = nvc.CreateDecoder(**decoder_kwargs(latency=getattr(lat, mode)))
                counts, stamps = [], []
                for i, au in enumerate(aus):
                    pkt, _buf = packet(au, pts=1000 + i)
                    pkt.decode_flag = flag
                    frames = dec.Decode(pkt)
                    counts.append(len(frames))
                    stamps += [f.timestamp for f in frames]
                tail = dec.Decode(flush_packet())
                say(f"latency={mode} decode_flag={flag}: per packet {counts}, flush {len(tail)}, ts {stamps[:5]}")

    def stream_order() -> None:
        """Decoder on our stream; per picture an async copy on that stream, no host sync, 2-surface ring:
        are the copies right (is the decoder's next write ordered after our kernel)?"""
        cp.cuda.runtime.free(0)
        ctx = int(cp.cuda.driver.ctxGetCurrent())
        for label, use_ours in (("decoder on our stream", True), ("decoder on stream 0, we on another", False)):
            stream = cp.cuda.Stream(non_blocking=True)
            dec = nvc.CreateDecoder(**decoder_kwargs(cudacontext=ctx, cudastream=int(stream.ptr) if use_ours else 0,
                                                     latency=nvc.DisplayDecodeLatencyType.LOW))
            copies = []
            with stream:
                for au in aus:
                    pkt, _buf = packet(au)
                    pkt.decode_flag = 8
                    for f in dec.Decode(pkt):
                        src = cp.from_dlpack(f)
                        dst = cp.empty_like(src)
                        # a slow-ish kernel first, so a racing decoder write would show
                        cp.multiply(src, 1, out=dst)
                        copies.append(dst)
                copies.extend(cp.from_dlpack(f).copy() for f in dec.Decode(flush_packet()))
            stream.synchronize()
            ok = []
            for i, want in EXPECTED.items():
                if i < len(copies):
                    h = cp.asnumpy(copies[i])
                    got = (hashlib.md5(np.ascontiguousarray(h[:HEIGHT]).tobytes(), usedforsecurity=False).hexdigest(),
                           hashlib.md5(np.ascontiguousarray(h[HEIGHT:]).tobytes(), usedforsecurity=False).hexdigest())
                    ok.append(got == want)
            say(f"{label}: {len(copies)} pictures, expected md5s match: {ok}")

    def decode_and_convert_timing() -> None:
        """Decode + a letterbox-sized elementwise op per picture, sync per picture vs stream-ordered."""
        cp.cuda.runtime.free(0)
        ctx = int(cp.cuda.driver.ctxGetCurrent())
        stream = cp.cuda.Stream(non_blocking=True)
        dec = nvc.CreateDecoder(**decoder_kwargs(cudacontext=ctx, cudastream=int(stream.ptr),
                                                 latency=nvc.DisplayDecodeLatencyType.LOW))
        bufs = [np.frombuffer(a, np.uint8) for a in aus]
        out = cp.empty((864, 768), cp.uint8)
        for sync in (True, False):
            n = 0
            t0 = time.perf_counter()
            with stream:
                for _ in range(10):
                    for b in bufs:
                        pkt, _ = packet(b)
                        pkt.decode_flag = 8
                        for f in dec.Decode(pkt):
                            cp.multiply(cp.from_dlpack(f), 1, out=out)
                            n += 1
                            if sync:
                                stream.synchronize()
                    dec.Decode(flush_packet())
            stream.synchronize()
            dt = time.perf_counter() - t0
            say(f"decode+op, host sync per picture={sync}: {n} pictures {n / dt:.0f}/s")

    for name, fn in (("versions", versions), ("api", api), ("decode (default)", decode_default),
                     ("latency modes", latency_modes), ("surface reuse", surface_reuse),
                     ("cupy context + stream", with_cupy_stream), ("timing", timing),
                     ("decoder caps", hevc_and_caps), ("garbage input", garbage),
                     ("end of picture flag", end_of_picture), ("stream order", stream_order),
                     ("decode + convert timing", decode_and_convert_timing)):
        section(name, fn)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
