"""The daemon under a real NOTIFY_SOCKET: READY, WATCHDOG, STATUS, RELOADING, STOPPING, SIGHUP reloads."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.extend((time.monotonic(), line) for line in data.decode().splitlines())

    def wait_for(self, prefix: str, timeout: float) -> float:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, m in self.messages:
                if m.startswith(prefix):
                    return t
            self.pump(0.2)
        raise AssertionError(f"no {prefix!r} within {timeout} s; got {[m for _, m in self.messages][-10:]}")

    def count(self, prefix: str, since: float = 0.0) -> int:
        return sum(1 for t, m in self.messages if m.startswith(prefix) and t >= since)


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def _cfg(path: Path, model: Path, vtest: Path, cameras: list[str], out: str, fps: float = 4.0) -> None:
    cams = "".join(
        f"  - id: {c}\n    queue_size: 50\n    source: {{type: replay, path: {vtest}, fps: {fps}, loop: true}}\n"
        for c in cameras
    )
    path.write_text(
        "version: 1\nnode: {site: t, area: t, line: t, node: t}\n"
        f"model: {{path: {model}}}\ncameras:\n{cams}batching: {{max_batch: 4, max_wait_ms: 20}}\n"
        f"outputs: {{jsonl: {{path: '{out}', include_stats: false}}}}\nstats: {{interval_s: 0.5}}\n"
    )


def _start(cfg: Path, notify: NotifyListener, watchdog_s: float) -> subprocess.Popen[str]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6)),
           "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "run", "-c", str(cfg), "--no-console", "--no-http",
         "--stop-timeout", "15"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_ready_watchdog_status_stopping(tmp_path: Path, notify: NotifyListener, model_path: Path,
                                        vtest_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    _cfg(cfg, model_path, vtest_path, ["a"], str(tmp_path / "d.jsonl"))
    proc = _start(cfg, notify, watchdog_s=4.0)
    try:
        ready = notify.wait_for("READY=1", 90)
        notify.pump(5.0)
        assert notify.count("WATCHDOG=1", since=ready) >= 2
        assert any(m.startswith("STATUS=") and "fps" in m for _, m in notify.messages)
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10)
        assert proc.wait(timeout=20) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait()


def test_frozen_pipeline_stops_the_watchdog(tmp_path: Path, notify: NotifyListener, model_path: Path,
                                            vtest_path: Path) -> None:
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the pipe fills, writes block
    cfg = tmp_path / "c.yaml"
    _cfg(cfg, model_path, vtest_path, ["a", "b"], str(fifo), fps=10)
    proc = _start(cfg, notify, watchdog_s=4.0)
    try:
        notify.wait_for("READY=1", 90)
        notify.wait_for("STATUS=pipeline stalled", 60)
        stalled = time.monotonic()
        notify.pump(4.0)
        assert notify.count("WATCHDOG=1", since=stalled + 0.1) == 0
    finally:
        proc.kill()
        proc.wait()
        os.close(reader)


def _detections(path: Path) -> list[dict[str, object]]:
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # the last line may be half written while we read
        if rec.get("kind") == "detections":
            out.append(rec)
    return out


def test_sighup_adds_and_removes_cameras_without_disturbing_others(
    tmp_path: Path, notify: NotifyListener, model_path: Path, vtest_path: Path
) -> None:
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "d.jsonl"
    _cfg(cfg, model_path, vtest_path, ["keep", "drop"], str(out))
    proc = _start(cfg, notify, watchdog_s=30.0)
    try:
        notify.wait_for("READY=1", 90)
        notify.pump(3.0)
        _cfg(cfg, model_path, vtest_path, ["keep", "new"], str(out))
        proc.send_signal(signal.SIGHUP)
        reload_wall = time.time()
        notify.wait_for("RELOADING=1", 10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(r["camera"] == "new" for r in _detections(out)):
            notify.pump(0.2)
        notify.pump(2.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    recs = _detections(out)
    keep = [r["seq"] for r in recs if r["camera"] == "keep"]
    assert keep == list(range(len(keep))), "the untouched camera lost or reordered frames"
    first_new = min(float(r["publish_time"]) for r in recs if r["camera"] == "new")  # type: ignore[arg-type]
    assert first_new - reload_wall < 2.0
    drop_after = [r for r in recs if r["camera"] == "drop" and float(r["capture_time"]) > reload_wall + 1.0]  # type: ignore[arg-type]
    assert not drop_after
