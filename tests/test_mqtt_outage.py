"""Store-and-forward against a real mosquitto: broker outages and publisher restarts lose nothing, keep order."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from mosquitto import Broker, Collector, make_result

from daemon.config.mqtt import MqttConfig
from daemon.publish.bench import run_mqtt_bench
from daemon.publish.mqtt import MqttPublisher

NODE = SimpleNamespace(site="plant", area="smt", line="l3", node="box1")
ROOT = "plant/smt/l3/deltayolo/box1"
CAMERAS = ("cam0", "cam1", "cam2", "cam3")
# CI keeps outages short; the acceptance run sets DELTAYOLO_MQTT_OUTAGE_S=30
OUTAGE_S = float(os.environ.get("DELTAYOLO_MQTT_OUTAGE_S", "3"))


def _publisher(broker: Broker, spool: Path, **extra: object) -> MqttPublisher:
    cfg = MqttConfig.model_validate({
        "host": broker.host, "port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
        "spool": {"path": str(spool)}, **extra,
    })
    pub = MqttPublisher(cfg, NODE)
    pub.start()
    return pub


class Producer:
    """Publishes results for CAMERAS at a fixed rate on its own thread, like the pipeline's publish thread."""

    def __init__(self, pub: MqttPublisher, rate_hz: float, start_seq: int = 0) -> None:
        self.pub = pub
        self.rate = rate_hz
        self.seq = start_seq
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Producer:
        self._thread.start()
        return self

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            for cam in CAMERAS:
                self.pub.publish_result(make_result(cam, self.seq, boxes=self.seq % 3))
            self.seq += 1
            delay = t0 + self.seq / self.rate - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.seq


def _check_complete(col: Collector, produced: int) -> dict[str, int]:
    """Every (camera, seq) arrived; first arrivals are in sequence order; returns duplicates per camera."""
    dups: dict[str, int] = {}
    for cam in CAMERAS:
        seqs = [json.loads(p)["seq"] for p in col.on(f"/{cam}/detections")]
        first: list[int] = []
        seen: set[int] = set()
        for s in seqs:
            if s not in seen:
                seen.add(s)
                first.append(s)
        assert seen == set(range(produced)), f"{cam}: missing {sorted(set(range(produced)) - seen)[:20]}"
        assert first == sorted(first), f"{cam}: out of order"
        dups[cam] = len(seqs) - len(first)
    return dups


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b
    b.stop()


def test_broker_outage_mid_stream_loses_nothing(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, [f"{ROOT}/+/detections"], client_id="outage-collector").start()
    pub = _publisher(broker, tmp_path / "spool.sqlite")
    prod = Producer(pub, rate_hz=25).start()
    time.sleep(1.0)
    broker.stop()
    time.sleep(OUTAGE_S)
    spooled_during = pub.counters().spool_messages
    broker.start()
    time.sleep(1.0)
    produced = prod.stop()
    assert col.wait_for(lambda: all(len(set(col.on(f"/{c}/detections"))) >= produced for c in CAMERAS), 20)
    dups = _check_complete(col, produced)
    c = pub.counters()
    pub.close(5)
    col.stop()
    assert spooled_during > 0
    assert c.disconnects == 1 and c.connects == 2
    assert c.dropped_overflow == 0 and c.spool_dropped == 0
    print(f"outage {OUTAGE_S:g} s: produced {produced} per camera ({produced * len(CAMERAS)} messages), "
          f"spooled during the outage {spooled_during}, all arrived in order, QoS 1 duplicates {dups}")


def test_publisher_restart_while_broker_down(broker: Broker, tmp_path: Path) -> None:
    spool = tmp_path / "spool.sqlite"
    col = Collector(broker, [f"{ROOT}/+/detections"], client_id="restart-collector").start()
    pub = _publisher(broker, spool)
    prod = Producer(pub, rate_hz=25).start()
    time.sleep(0.8)
    broker.stop()
    time.sleep(OUTAGE_S / 3)
    first_run = prod.stop()
    pub.close(2)  # the daemon stops while the broker is away: everything not acked stays in the spool
    assert pub.spool is not None and not pub.spool.is_open
    pub2 = _publisher(broker, spool)
    assert pub2.counters().spool_messages > 0
    prod2 = Producer(pub2, rate_hz=25, start_seq=first_run).start()
    time.sleep(OUTAGE_S * 2 / 3)
    broker.start()
    time.sleep(1.0)
    produced = prod2.stop()
    assert col.wait_for(lambda: all(len(set(col.on(f"/{c}/detections"))) >= produced for c in CAMERAS), 20)
    dups = _check_complete(col, produced)
    pub2.close(5)
    col.stop()
    assert pub2.counters().spool_messages == 0
    print(f"broker down {OUTAGE_S:g} s across a publisher restart: produced {produced} per camera "
          f"({first_run} before the restart), all arrived in order, QoS 1 duplicates {dups}")


def test_bench_runs_briefly(tmp_path: Path) -> None:
    res = run_mqtt_bench(cameras=10, fps=30, seconds=2.0, spool_dir=tmp_path)
    assert res.received == res.sent > 0
    assert res.lost == 0
    assert res.publish_p99_ms is not None and res.publish_p99_ms > 0
