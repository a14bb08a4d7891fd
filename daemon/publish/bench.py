"""`deltayolo bench mqtt`: sustained detection traffic through MqttPublisher to a real broker, with latencies.

By default it starts a private mosquitto on a free 127.0.0.1 port (needs the `mosquitto` binary) and a paho
subscriber that checks every message arrived once and in order. Figures: publish latency (publish_result ->
broker PUBACK, what the spool waits for), end-to-end latency (publish_result -> the subscriber has it) and the
time publish_result itself takes on the caller's thread. `--no-durable` / `--fsync` compare the write-ahead
spool modes; `delivered_msg_s` is what reached the subscriber per second (the ceiling when the offer is higher).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config.mqtt import MqttConfig
from daemon.publish import payloads
from daemon.publish.mqtt import MqttPublisher
from daemon.publish.outbound import percentile
from daemon.types import Detection, FrameResult, StageTimes

_NODE = SimpleNamespace(site="bench", area="a", line="l", node="n")
_ROOT = "bench/a/l/deltayolo/n"


@dataclass(frozen=True, slots=True)
class MqttBenchResult:
    cameras: int
    fps: float
    seconds: float
    qos: int
    protocol: str
    durable: bool
    fsync: bool
    sent: int
    received: int
    lost: int
    duplicates: int
    out_of_order: int
    offered_msg_s: float
    achieved_msg_s: float
    delivered_msg_s: float
    cpu_s: float
    messages_per_commit: float | None
    payload_bytes_mean: float
    publish_p50_ms: float | None
    publish_p99_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    call_p99_us: float
    behind_schedule_s: float


class _LocalBroker:
    """A throw-away mosquitto on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        conf = folder / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "max_queued_messages 1000000",
                 "max_inflight_messages 1000", "persistence false"]
        if os.geteuid() == 0:
            lines.append("user root")
        conf.write_text("\n".join(lines) + "\n")
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self._proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,  # noqa: S603
                                      stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)


class _Subscriber:
    def __init__(self, host: str, port: int, qos: int) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="deltayolo-bench-sub")
        self.client.max_inflight_messages_set(1000)
        self.lock = threading.Lock()
        self.count = 0
        self.dups = 0
        self.out_of_order = 0
        self.last: dict[str, int] = {}
        self.seen: dict[str, set[int]] = {}
        self.e2e: list[float] = []
        self.last_at = 0.0
        self.ready = threading.Event()
        self.client.on_connect = lambda c, *_: c.subscribe(f"{_ROOT}/+/detections", qos)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self._on_message
        self.client.connect(host, port, 30)
        self.client.loop_start()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.time()
        d = json.loads(msg.payload)
        cam, seq = d["camera"], d["seq"]
        with self.lock:
            seen = self.seen.setdefault(cam, set())
            if seq in seen:
                self.dups += 1
                return
            seen.add(seq)
            self.count += 1
            if seq < self.last.get(cam, -1):
                self.out_of_order += 1
            self.last[cam] = seq
            self.e2e.append(now - d["publish_time"])
            self.last_at = time.monotonic()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _results(cameras: list[str], seq: int, boxes: int) -> list[FrameResult]:
    now, mono = time.time(), time.monotonic()
    dets = tuple(Detection(i, "person", 0.9 - 0.01 * i, 100.0 + i, 120.0, 180.5 + i, 300.25) for i in range(boxes))
    return [FrameResult(c, seq, now, mono, 1280, 960, dets, 150_000, 3_686_400, times=StageTimes())
            for c in cameras]


def run_mqtt_bench(cameras: int = 100, fps: float = 30.0, seconds: float = 60.0, host: str | None = None,
                   port: int = 1883, qos: int = 1, protocol: str = "3.1.1", boxes: int = 3,
                   spool_dir: Path | None = None, durable: bool = True, fsync: bool = False) -> MqttBenchResult:
    """Offer cameras x fps detection messages per second for `seconds`; measure what arrives and how fast."""
    with tempfile.TemporaryDirectory(prefix="deltayolo-bench-mqtt-") as tmp:
        folder = Path(tmp)
        broker = _LocalBroker(folder) if host is None else None
        h, p = ("127.0.0.1", broker.port) if broker is not None else (host or "127.0.0.1", port)
        sub = _Subscriber(h, p, qos)
        try:
            if not sub.ready.wait(10):
                raise RuntimeError(f"bench subscriber could not subscribe on {h}:{p}")
            cfg = MqttConfig.model_validate({
                "host": h, "port": p, "protocol": protocol, "max_inflight": 1000, "publish_stats": False,
                "qos": {"detections": qos}, "commands": {"enabled": False}, "durable": durable,
                "spool": {"path": str((spool_dir or folder) / "bench-spool.sqlite"), "fsync": fsync},
            })
            pub = MqttPublisher(cfg, _NODE)
            pub.start()
            try:
                return _drive(pub, sub, cfg, cameras, fps, seconds, boxes)
            finally:
                pub.close(5)
        finally:
            sub.stop()
            if broker is not None:
                broker.stop()


def _drive(pub: MqttPublisher, sub: _Subscriber, cfg: MqttConfig, cameras: int, fps: float, seconds: float,
           boxes: int) -> MqttBenchResult:
    deadline = time.monotonic() + 10
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.01)
    names = [f"cam{i:03d}" for i in range(cameras)]
    calls: list[float] = []
    ticks = max(1, int(seconds * fps))
    t0, cpu0 = time.monotonic(), time.process_time()
    behind = 0.0
    for seq in range(ticks):
        for r in _results(names, seq, boxes):
            c0 = time.perf_counter()
            pub.publish_result(r)
            calls.append(time.perf_counter() - c0)
        wait = t0 + (seq + 1) / fps - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            behind = max(behind, -wait)
    elapsed = time.monotonic() - t0
    sent = ticks * cameras
    end = time.monotonic() + 30
    while time.monotonic() < end and sub.count < sent:
        time.sleep(0.05)
    cpu = time.process_time() - cpu0
    counters = pub.counters()
    with sub.lock:
        e2e = list(sub.e2e)
        received, dups, ooo, last_at = sub.count, sub.dups, sub.out_of_order, sub.last_at
    size = len(payloads.encode(payloads.detections_payload(_results(["cam000"], 0, boxes)[0])))
    return MqttBenchResult(
        cameras=cameras, fps=fps, seconds=seconds, qos=cfg.qos.detections, protocol=cfg.protocol,
        durable=cfg.durable, fsync=cfg.spool.fsync, sent=sent, received=received,
        lost=sent - received, duplicates=dups, out_of_order=ooo, offered_msg_s=cameras * fps,
        achieved_msg_s=sent / elapsed if elapsed > 0 else 0.0,
        delivered_msg_s=received / (last_at - t0) if last_at > t0 else 0.0, cpu_s=cpu,
        messages_per_commit=sent / counters.spool_commits if counters.spool_commits else None,
        payload_bytes_mean=float(size),
        publish_p50_ms=counters.ack_latency_p50_ms, publish_p99_ms=counters.ack_latency_p99_ms,
        e2e_p50_ms=percentile(e2e, 50) * 1000 if e2e else None,
        e2e_p99_ms=percentile(e2e, 99) * 1000 if e2e else None,
        call_p99_us=percentile(calls, 99) * 1e6 if calls else 0.0, behind_schedule_s=behind,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cameras", type=int, default=100, help="cameras (one message per camera per frame)")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second per camera")
    p.add_argument("--seconds", type=float, default=60.0, help="how long to offer the load")
    p.add_argument("--host", default=None, help="use this broker instead of a private mosquitto")
    p.add_argument("--port", type=int, default=1883, help="broker port with --host")
    p.add_argument("--qos", type=int, choices=(0, 1, 2), default=1, help="QoS of detection messages")
    p.add_argument("--protocol", choices=("3.1.1", "5"), default="3.1.1", help="MQTT version")
    p.add_argument("--boxes", type=int, default=3, help="boxes per detection message")
    p.add_argument("--durable", action=argparse.BooleanOptionalAction, default=True,
                   help="write-ahead spool (mqtt.durable); --no-durable spools only during outages")
    p.add_argument("--fsync", action="store_true", help="spool.fsync: SQLite synchronous=FULL (power-loss safe)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here as JSON")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def main(args: argparse.Namespace) -> int:
    res = run_mqtt_bench(args.cameras, args.fps, args.seconds, args.host, args.port, args.qos, args.protocol,
                         args.boxes, durable=args.durable, fsync=args.fsync)
    print(f"offered {res.offered_msg_s:.0f} msg/s ({res.cameras} cameras x {res.fps:g} fps) for {res.seconds:g} s, "
          f"achieved {res.achieved_msg_s:.0f} msg/s, QoS {res.qos}, MQTT {res.protocol}, "
          f"durable {'on' if res.durable else 'off'}{' (fsync)' if res.fsync else ''}")
    print(f"delivered {res.delivered_msg_s:.0f} msg/s to the subscriber; CPU {res.cpu_s:.1f} s "
          f"({100 * res.cpu_s / max(res.seconds, 1e-9):.0f}% of one core, publisher + subscriber)"
          + (f"; {res.messages_per_commit:.1f} messages per spool commit" if res.messages_per_commit else ""))
    print(f"sent {res.sent}  received {res.received}  lost {res.lost}  duplicates {res.duplicates}  "
          f"out of order {res.out_of_order}")
    print(f"publish latency (call -> PUBACK) p50 {_fmt(res.publish_p50_ms)} ms  p99 {_fmt(res.publish_p99_ms)} ms")
    print(f"end-to-end (call -> subscriber) p50 {_fmt(res.e2e_p50_ms)} ms  p99 {_fmt(res.e2e_p99_ms)} ms")
    print(f"publish_result call p99 {res.call_p99_us:.0f} us; producer fell behind schedule by at most "
          f"{res.behind_schedule_s * 1000:.0f} ms")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(res), indent=1) + "\n")
    return 0 if res.lost == 0 else 1
