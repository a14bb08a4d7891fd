"""`deltayolo run` killed with SIGKILL mid-stream while the broker holds its messages unacked, then restarted on
the same spool: every detection produced before the kill reaches the subscriber (QoS 1 duplicates allowed).

The witness of what was produced is the daemon's own JSON-lines output (written and flushed before the MQTT
publisher takes the same result). The pipeline hands each result to the JSON-lines file first and to MQTT a
moment later; MQTT commits it within one sender loop (milliseconds). The kill comes 50 ms after a frame, so even
that last frame is committed; only it is allowed to be missing, should a loaded CI box stall the sender longer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mosquitto import Broker, Collector

ROOT = "plant/smt/l1/deltayolo/crashbox"
FPS = 10


def _config(path: Path, model: Path, vtest: Path, broker: Broker, spool: Path, out: Path, durable: bool) -> None:
    path.write_text(
        "version: 1\nnode: {site: plant, area: smt, line: l1, node: crashbox}\n"
        f"model: {{path: {model}}}\ncameras:\n"
        f"  - id: cam1\n    source: {{type: replay, path: {vtest}, fps: {FPS}, loop: true}}\n"
        "outputs:\n"
        f"  jsonl: {{path: '{out}', include_stats: false, flush_every: 1}}\n"
        f"  mqtt: {{host: 127.0.0.1, port: {broker.port}, durable: {str(durable).lower()}, reconnect_min_s: 0.2,\n"
        f"         reconnect_max_s: 0.5, commands: {{enabled: false}}, publish_stats: false,\n"
        f"         spool: {{path: '{spool}'}}}}\n"
    )


def _start(cfg: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", "run", "-c", str(cfg), "--no-console", "--no-http",
                             "--stop-timeout", "5"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _witness(out: Path) -> list[int]:
    seqs = []
    for line in out.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the kill
        if rec.get("kind") == "detections" and rec.get("camera") == "cam1":
            seqs.append(int(rec["seq"]))
    return seqs


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkilled_daemon_loses_no_detection(tmp_path: Path, model_path: Path, vtest_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    col = Collector(broker, [f"{ROOT}/cam1/detections"], client_id="crash-collector").start()
    cfg, out, spool = tmp_path / "c.yaml", tmp_path / "witness.jsonl", tmp_path / "spool.sqlite"
    _config(cfg, model_path, vtest_path, broker, spool, out, durable=True)
    procs = [_start(cfg)]
    try:
        _wait(lambda: len(col.on("/cam1/detections")) >= 5, 90, "the first detections")
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGSTOP)  # no more PUBACKs: what the daemon sends stays unacked
        try:
            paused_at = len(_witness(out))
            _wait(lambda: len(_witness(out)) >= paused_at + FPS * 1.5, 20, "frames while the broker is paused")
            n = len(_witness(out))
            _wait(lambda: len(_witness(out)) > n, 5, "one more frame")
            time.sleep(0.05)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(5)
            killed_at = time.time()
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        produced = _witness(out)  # a frame the pipeline dropped (queue full) has no detection message anywhere
        procs.append(_start(cfg))  # the same config, the same spool: it replays what the first one left
        must = set(produced[:-1])

        def first_run() -> list[dict[str, float]]:
            return [m for m in map(json.loads, col.on("/cam1/detections")) if m["capture_time"] < killed_at]

        col.wait_for(lambda: must <= {m["seq"] for m in first_run()}, 30)
        got = {int(m["seq"]) for m in first_run()}
        assert must <= got <= set(produced), f"{len(must - got)} of {len(must)} missing: {sorted(must - got)}"
        _wait(lambda: len(col.on("/cam1/detections")) > len(first_run()), 30, "new detections after the restart")
        arrivals = [m["capture_time"] < killed_at for m in map(json.loads, col.on("/cam1/detections"))]
        assert all(arrivals[: arrivals.index(False)]) and not any(arrivals[arrivals.index(False):]), (
            "the previous run's messages were not replayed before new ones")
        dups = len(first_run()) - len(got)
        print(f"killed after {len(produced)} frames ({len(produced) - paused_at} while the broker was paused); "
              f"{len(got)} arrived, QoS 1 duplicates {dups}")
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
        col.stop()
        broker.stop()
