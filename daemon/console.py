"""The live one-screen summary `deltayolo run` shows in a terminal."""

from __future__ import annotations

from typing import TextIO

from daemon.stats.model import NodeStats

_CLEAR = "\x1b[H\x1b[2J"


def render(stats: NodeStats, title: str = "deltayolo") -> str:
    lines = [
        f"{title}  backend {stats.backend}  uptime {stats.uptime_s:7.1f} s  "
        f"node {stats.fps:6.1f} fps  p50 {stats.latency_p50_ms:6.1f} ms  p99 {stats.latency_p99_ms:6.1f} ms",
        f"in {stats.bytes_in_per_s / 1e6:7.2f} MB/s   decoded {stats.bytes_decoded_per_s / 1e6:7.2f} MB/s   "
        + "  ".join(f"{k} {v:.1f} ms" for k, v in stats.stage_ms),
        "",
        f"{'camera':<16} {'up':>3} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'dets':>6} "
        f"{'recv':>7} {'done':>7} {'drop':>6} {'skip':>6} {'bad':>5} {'reconn':>6}",
    ]
    lines.extend(
        f"{c.camera[:16]:<16} {'yes' if c.alive else 'NO':>3} {c.fps:6.1f} {c.latency_p50_ms:7.1f} "
        f"{c.latency_p99_ms:7.1f} {c.detections:6d} {c.received:7d} {c.processed:7d} {c.dropped:6d} "
        f"{c.skipped:6d} {c.corrupt:5d} {c.reconnects:6d}"
        for c in stats.cameras
    )
    return "\n".join(lines) + "\n"


class ConsoleSummary:
    """Redraws the screen on a terminal; prints one compact line per interval elsewhere (journald, pipes)."""

    def __init__(self, stream: TextIO, live: bool, extra: str = "") -> None:
        self._stream = stream
        self._live = live
        self._extra = extra

    def __call__(self, stats: NodeStats) -> None:
        if self._live:
            text = _CLEAR + render(stats) + (f"\n{self._extra}\n" if self._extra else "")
        else:
            cams = " ".join(f"{c.camera}={c.fps:.1f}fps/{c.detections}det" for c in stats.cameras)
            text = f"stats fps={stats.fps:.1f} p50={stats.latency_p50_ms:.1f}ms {cams}\n"
        self._stream.write(text)
        self._stream.flush()
