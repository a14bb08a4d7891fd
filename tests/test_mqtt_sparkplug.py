"""Sparkplug B mode against a real mosquitto: NBIRTH/NDEATH with bdSeq (NDEATH is the will), DBIRTH per camera,
DDATA seq 0-255, NCMD rebirth."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
from mosquitto import Broker, Collector, make_result, run_child
from paho.mqtt.enums import CallbackAPIVersion

from daemon.config.mqtt import MqttConfig
from daemon.publish import sparkplug
from daemon.publish.mqtt import MqttPublisher

NODE = SimpleNamespace(site="plant", area="smt", line="l3", node="box1")
GROUP = "plant:smt:l3"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("spb"))
    b.start()
    yield b
    b.stop()


def _decoded(col: Collector) -> list[tuple[str, Any]]:
    return [(t.split("/")[2], sparkplug.decode(p)) for t, p, _r in list(col.messages)]


def _metric(p: Any, name: str) -> Any:
    return next(m for m in p.metrics if m.name == name)


def test_sparkplug_session(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, ["spBv1.0/#"], client_id="spb-col", persistent=False).start()
    cfg = MqttConfig.model_validate({"host": broker.host, "port": broker.port, "format": "sparkplug",
                                     "spool": {"path": str(tmp_path / "s.sqlite")}})
    pub = MqttPublisher(cfg, NODE)
    pub.start()
    pub.publish_camera_state("cam1", "streaming", "")
    for seq in range(300):
        pub.publish_result(make_result("cam1", seq, boxes=seq % 3))
    assert col.wait_for(lambda: sum(1 for t, _p, _r in col.messages if "/DDATA/" in t) >= 301, 15)
    msgs = _decoded(col)
    assert msgs[0][0] == "NBIRTH" and msgs[0][1].seq == 0
    bdseq = _metric(msgs[0][1], "bdSeq").long_value
    assert _metric(msgs[0][1], sparkplug.REBIRTH).boolean_value is False
    assert msgs[1][0] == "DBIRTH" and msgs[1][1].seq == 1
    assert {m.name for m in msgs[1][1].metrics} == {n for n, _ in sparkplug.DEVICE_METRICS}
    seqs = [p.seq for _k, p in msgs]
    assert all(b == (a + 1) % 256 for a, b in itertools.pairwise(seqs)), seqs
    assert 255 in seqs and seqs.count(0) == 2  # wrapped once after NBIRTH's 0
    frames = [_metric(p, "Frame/Seq").long_value for k, p in msgs if k == "DDATA" and
              any(m.name == "Frame/Seq" for m in p.metrics)]
    assert frames == list(range(300))
    # NCMD rebirth: a new NBIRTH (seq 0, same bdSeq) and DBIRTH
    n_before = len(col.messages)
    ncmd = sparkplug.pb.Payload()
    m = ncmd.metrics.add()
    m.name, m.datatype, m.boolean_value = sparkplug.REBIRTH, sparkplug.DT.Boolean, True
    c = paho.Client(CallbackAPIVersion.VERSION2)
    c.connect(broker.host, broker.port)
    c.loop_start()
    c.publish(f"spBv1.0/{GROUP}/NCMD/box1", ncmd.SerializeToString(), 0).wait_for_publish(5)
    assert col.wait_for(lambda: any("/DBIRTH/" in t for t, _p, _r in col.messages[n_before:]), 10)
    again = [(k, p) for k, p in _decoded(col)[n_before:] if k != "NCMD"]
    assert [k for k, _p in again[:2]] == ["NBIRTH", "DBIRTH"]
    assert again[0][1].seq == 0 and _metric(again[0][1], "bdSeq").long_value == bdseq
    c.disconnect()
    c.loop_stop()
    pub.close(5)
    assert col.wait_for(lambda: any("/NDEATH/" in t for t, _p, _r in col.messages), 5)
    death = _decoded(col)[-1]
    assert death[0] == "NDEATH" and _metric(death[1], "bdSeq").long_value == bdseq
    col.stop()


def test_ndeath_is_the_last_will_with_the_birth_bdseq(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, [f"spBv1.0/{GROUP}/+/box1"], client_id="will-col", persistent=False).start()
    spool = str(tmp_path / "s.sqlite")
    proc = run_child({"host": broker.host, "port": broker.port, "format": "sparkplug", "spool": {"path": spool}},
                     vars(NODE))
    try:
        assert col.wait_for(lambda: any("/NBIRTH/" in t for t, _p, _r in col.messages), 10)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert col.wait_for(lambda: any("/NDEATH/" in t for t, _p, _r in col.messages), 10)
    births = [p for k, p in _decoded(col) if k == "NBIRTH"]
    deaths = [p for k, p in _decoded(col) if k == "NDEATH"]
    assert _metric(deaths[-1], "bdSeq").long_value == _metric(births[-1], "bdSeq").long_value
    col.stop()


def test_both_formats_at_once(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, ["spBv1.0/#", "plant/#"], client_id="both-col", persistent=False).start()
    cfg = MqttConfig.model_validate({"host": broker.host, "port": broker.port, "format": "both",
                                     "spool": {"path": str(tmp_path / "s.sqlite")},
                                     "sparkplug": {"group_id": "G1", "edge_node_id": "E1", "data_qos": 1}})
    pub = MqttPublisher(cfg, NODE)
    pub.start()
    pub.publish_result(make_result("camA", 5))
    assert col.wait_for(lambda: bool(col.on("/camA/detections")) and bool(col.on("spBv1.0/G1/DDATA/E1/camA")), 10)
    assert json.loads(col.on("/camA/detections")[0])["seq"] == 5
    assert col.qos["spBv1.0/G1/DDATA/E1/camA"] == 1
    pub.close(5)
    time.sleep(0.2)
    col.stop()
