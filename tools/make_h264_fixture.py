"""Write tests/data/vtest30.h264: the first 30 frames of the vtest video (768x576) as a raw H.264 Annex-B
elementary stream (libx264 through PyAV, no B-frames, one access unit delimiter per frame, no colour VUI, so
decoders fall back to BT.601 limited range). Used by tools/nvdec_probe.py and the NVDEC tests.

Usage: DELTAYOLO_CACHE=.devcache python3 tools/make_h264_fixture.py [OUT] [FRAMES]
"""

from __future__ import annotations

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
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
