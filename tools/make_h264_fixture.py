"""Write tests/data/vtest30.h264: the first 30 frames of the vtest video (768x576) as a raw H.264 Annex-B
elementary stream (libx264 through PyAV, no B-frames, one access unit delimiter per frame, no colour VUI, so
decoders fall back to BT.601 limited range), and beside it OUT.md5.json: the md5 of the Y and interleaved UV planes
of frames 0, 1, 2 and the last as libavcodec decodes the file (NVDEC must be bit-exact with them). Used by the
NVDEC tests.

Usage: DELTAYOLO_CACHE=.devcache python3 tools/make_h264_fixture.py [OUT] [FRAMES]
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import av

from daemon.models.fetch import ensure


def main(argv: list[str]) -> int:
    out = Path(argv[1]) if len(argv) > 1 else Path("tests/data/vtest30.h264")
    frames = int(argv[2]) if len(argv) > 2 else 30
    src = av.open(str(ensure("vtest")))
    dst = av.open(str(out), mode="w", format="h264")
    stream = dst.add_stream("libx264", rate=10)
    stream.width, stream.height, stream.pix_fmt = 768, 576, "yuv420p"
    stream.options = {"preset": "medium", "crf": "28", "bf": "0", "g": "30", "x264-params": "aud=1"}
    n = 0
    for frame in src.decode(video=0):
        if n >= frames:
            break
        rgb = frame.reformat(format="yuv420p")
        rgb.pts = n
        for packet in stream.encode(rgb):
            dst.mux(packet)
        n += 1
    for packet in stream.encode(None):
        dst.mux(packet)
    dst.close()
    src.close()
    print(f"{out}: {n} frames, {out.stat().st_size} bytes")
    hashes = plane_hashes(out, {0, 1, 2, n - 1})
    Path(f"{out}.md5.json").write_text(json.dumps({
        "_": f"md5 of the tight Y plane and of the tight interleaved UV plane (NV12) of frames {sorted(hashes)} of "
             f"{out.name} as libavcodec (PyAV {av.__version__}) decodes it", "frames": hashes}, indent=1) + "\n")
    return 0


def plane_hashes(path: Path, wanted: set[int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    with av.open(str(path)) as src:
        for i, frame in enumerate(src.decode(video=0)):
            if i in wanted:
                nv12 = frame.to_ndarray(format="nv12")
                h = frame.height
                out[str(i)] = [hashlib.md5(nv12[:h].tobytes()).hexdigest(),  # noqa: S324 - a fingerprint
                               hashlib.md5(nv12[h:].tobytes()).hexdigest()]  # noqa: S324
    return out


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
