"""MqttPublisher against a real mosquitto: the JSON tree, schema, birth/will, commands, TLS + passwords,
mosquitto_sub and `deltayolo mqtt-tail`."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import paho.mqtt.client as paho
import pytest
from mosquitto import Broker, Collector, make_result, make_tls, run_child
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config.mqtt import MqttConfig
from daemon.mqtt_tail import add_arguments, run_mqtt_tail
from daemon.publish import payloads
from daemon.publish.commands import Command, CommandOutcome, SetThresholds
from daemon.publish.mqtt import MqttPublisher
from daemon.stats.model import NodeStats
from daemon.types import FrameError

REPO = Path(__file__).resolve().parents[1]
NODE = SimpleNamespace(site="plant", area="smt", line="l3", node="box1")
ROOT = "plant/smt/l3/deltayolo/box1"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(tmp_path_factory.mktemp("broker"))
    b.start()
    yield b
    b.stop()


def _cfg(broker: Broker, tmp: Path, **extra: Any) -> MqttConfig:
    return MqttConfig.model_validate({"host": broker.host, "port": broker.port, "reconnect_min_s": 0.2,
                                      "spool": {"path": str(tmp / "spool.sqlite")}, **extra})


_OPEN: list[MqttPublisher] = []


@pytest.fixture(autouse=True)
def _close_leftovers() -> Iterator[None]:
    """A failed test must not leave a publisher subscribed to commands for the next one (shared broker)."""
    yield
    while _OPEN:
        _OPEN.pop().close(1)


def _started(cfg: MqttConfig, handler: Any = None) -> MqttPublisher:
    pub = MqttPublisher(cfg, NODE, handler)
    _OPEN.append(pub)
    pub.start()
    deadline = time.monotonic() + 10
    while not pub.connected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert pub.connected
    return pub


def _stats() -> NodeStats:
    return NodeStats(time.time(), 5.0, 12.0, "cpu:onnxruntime", "no GPU", 29.0, 30.0, 45.0, 3e6, 4e7, 0.0, 0.0,
                     (("decode", 3.0),), ())


def test_json_tree_messages_match_the_schema_and_qos(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, [f"{ROOT}/#"], client_id="schema-col", persistent=False).start()
    pub = _started(_cfg(broker, tmp_path, qos={"stats": 0, "detections": 1}, include_empty=False))
    pub.publish_camera_state("cam1", "streaming", "")
    pub.publish_result(make_result("cam1", 1, boxes=2))
    pub.publish_result(make_result("cam1", 2, boxes=0))  # include_empty: false -> not published
    pub.publish_error(FrameError("cam1", 3, "corrupt", "bad JPEG"))
    pub.publish_stats(_stats())
    assert col.wait_for(lambda: len(col.on("/stats")) == 1 and len(col.on("/errors")) == 1, 10)
    validator = jsonschema.Draft202012Validator(payloads.load_schema())
    kinds = set()
    for topic, body, _retain in list(col.messages):
        doc = json.loads(body)
        assert not list(validator.iter_errors(doc)), topic
        kinds.add(doc["kind"])
    assert {"status", "camera_state", "availability", "detections", "frame_error", "stats"} <= kinds
    assert [json.loads(b)["seq"] for b in col.on("/cam1/detections")] == [1]
    assert col.qos[f"{ROOT}/stats"] == 0 and col.qos[f"{ROOT}/cam1/detections"] == 1
    pub.close(5)
    # after a clean close the retained status says offline, cleanly; camera availability says offline
    late = Collector(broker, [f"{ROOT}/status", f"{ROOT}/cam1/availability"], client_id="late",
                     persistent=False).start()
    assert late.wait_for(lambda: len(late.messages) == 2, 5)
    status = json.loads(late.on("/status")[0])
    assert (status["state"], status["clean"]) == ("offline", True)
    assert json.loads(late.on("/availability")[0])["state"] == "offline"
    assert all(r for _t, _b, r in late.messages)
    late.stop()
    col.stop()


def test_last_will_marks_the_node_offline_when_it_dies(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, [f"{ROOT}/status"], client_id="will-col", persistent=False).start()
    proc = run_child({"host": broker.host, "port": broker.port, "spool": {"path": str(tmp_path / "c.sqlite")}},
                     vars(NODE))
    try:
        assert col.wait_for(lambda: any(json.loads(b)["state"] == "online" for b in col.on("/status")), 10)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert col.wait_for(lambda: json.loads(col.on("/status")[-1])["state"] == "offline", 10)
    will = json.loads(col.on("/status")[-1])
    assert will["clean"] is False and will["client_id"] == "deltayolo-plant-smt-l3-box1"
    col.stop()


class Recorder:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    def handle(self, cmd: Command) -> CommandOutcome:
        self.commands.append(cmd)
        if isinstance(cmd, SetThresholds) and cmd.camera != "cam1":
            return CommandOutcome(False, f"unknown camera {cmd.camera!r}")
        return CommandOutcome(True, "applied")


def _send(broker: Broker, topic: str, payload: bytes, v5: bool = False,
          response: str | None = None, correlation: bytes | None = None) -> None:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5 if v5 else
                    MQTTProtocolVersion.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    props = None
    if response is not None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = response
        props.CorrelationData = correlation
    c.publish(topic, payload, 1, properties=props).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_commands_are_acknowledged(broker: Broker, tmp_path: Path, protocol: str) -> None:
    col = Collector(broker, [f"{ROOT}/ack", "replies/#"], client_id=f"ack-col-{protocol}", persistent=False,
                    v5=True).start()
    rec = Recorder()
    pub = _started(_cfg(broker, tmp_path, protocol=protocol, client_id=f"cmd-{protocol.replace('.', '')}"), rec)
    _send(broker, f"{ROOT}/cmd/cam1/set_thresholds", b'{"confidence": 0.4, "id": "t1"}')
    _send(broker, f"{ROOT}/cmd/cam9/set_thresholds", b'{"iou": 0.5}')
    _send(broker, f"{ROOT}/cmd/cam1/set_thresholds", b'{"confidence": "high"}')
    _send(broker, f"{ROOT}/cmd/cam1/keyframe", b"\xff" * 70_000)
    _send(broker, f"{ROOT}/cmd/cam1/disable", b"{}", v5=True, response="replies/me", correlation=b"corr-7")
    replies = 1 if protocol == "5" else 0  # an MQTT 3.1.1 session never sees the response topic property
    assert col.wait_for(lambda: len(col.on("/ack")) == 5 and len(col.on("replies/me")) == replies, 20)
    acks = [json.loads(b) for b in col.on("/ack")]
    assert [(a["command"], a["ok"]) for a in acks] == [
        ("set_thresholds", True), ("set_thresholds", False), ("set_thresholds", False), ("keyframe", False),
        ("disable", True)]
    assert acks[0]["id"] == "t1" and acks[1]["message"] == "unknown camera 'cam9'"
    assert "confidence must be a number" in acks[2]["message"]
    assert "70000 bytes exceeds the limit of 65536" in acks[3]["message"]
    assert rec.commands[0] == SetThresholds("cam1", 0.4, None, "t1") and len(rec.commands) == 3
    if replies:
        i = [t for t, _b, _r in col.messages].index("replies/me")
        assert getattr(col.props[i], "CorrelationData", None) == b"corr-7"
        assert json.loads(col.on("replies/me")[0])["command"] == "disable"
    c = pub.counters()
    assert (c.commands_ok, c.commands_failed, c.commands_rejected, c.callback_errors) == (2, 1, 2, 0)
    pub.close(5)
    col.stop()


def test_commands_can_be_switched_off(broker: Broker, tmp_path: Path) -> None:
    col = Collector(broker, [f"{ROOT}/ack"], client_id="off-col", persistent=False).start()
    rec = Recorder()
    pub = _started(_cfg(broker, tmp_path, commands={"enabled": False}, client_id="cmd-off"), rec)
    _send(broker, f"{ROOT}/cmd/cam1/keyframe", b"{}")
    time.sleep(0.5)
    assert rec.commands == [] and col.on("/ack") == []
    pub.close(5)
    col.stop()


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Any]]:
    folder = tmp_path_factory.mktemp("tls")
    tls = make_tls(folder / "pki")
    b = Broker(folder / "broker", tls=tls, users={"box": "pa55-word", "reader": "r3ad"}, require_client_cert=True)
    b.start()
    yield b, tls
    b.stop()


def test_tls_client_certificate_and_password_file(tls_broker: tuple[Broker, Any], tmp_path: Path) -> None:
    b, tls = tls_broker
    pw = tmp_path / "mqtt.pass"
    pw.write_text("pa55-word\n")
    cfg = MqttConfig.model_validate({
        "host": "localhost", "port": b.port, "username": "box", "password_file": str(pw),
        "tls": {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)},
        "spool": {"path": str(tmp_path / "spool.sqlite")},
    })
    sub = subprocess.Popen(
        ["mosquitto_sub", "-h", "localhost", "-p", str(b.port), "--cafile", str(tls.ca), "--cert",
         str(tls.client_cert), "--key", str(tls.client_key), "-u", "reader", "-P", "r3ad", "-C", "1", "-W", "15",
         "-t", f"{ROOT}/cam1/detections"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    pub = _started(cfg)
    pub.publish_result(make_result("cam1", 11))
    out, err = sub.communicate(timeout=20)
    assert sub.returncode == 0, err
    assert json.loads(out)["seq"] == 11
    pub.close(5)


def test_wrong_password_is_refused_and_counted(tls_broker: tuple[Broker, Any], tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    b, tls = tls_broker
    cfg = MqttConfig.model_validate({
        "host": "localhost", "port": b.port, "username": "box", "password_env": "DY_TEST_PW",
        "reconnect_min_s": 0.2, "reconnect_max_s": 0.4,
        "tls": {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert), "key_file": str(tls.client_key)},
        "spool": {"path": str(tmp_path / "spool.sqlite")},
    })
    pub = MqttPublisher(cfg, NODE, environ={"DY_TEST_PW": "not-the-password"})
    _OPEN.append(pub)
    pub.start()
    pub.publish_result(make_result("cam1", 1))
    deadline = time.monotonic() + 10
    while pub.counters().refused < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    c = pub.counters()
    pub.close(1)
    assert c.refused >= 2 and not c.connected and c.callback_errors == 0
    assert "not-the-password" not in caplog.text
    assert pub.spool is not None
    reopened = MqttPublisher(cfg, NODE, environ={"DY_TEST_PW": "x"})
    _OPEN.append(reopened)
    reopened.start()
    assert reopened.counters().spool_messages >= 1  # the detection waits for a broker that takes it
    reopened.close(0.5)


def test_mqtt_tail_prints_what_the_box_sends(broker: Broker, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    pub = _started(_cfg(broker, tmp_path, client_id="tail-src"))
    for json_mode in (False, True):
        out = io.StringIO()
        args = parser.parse_args(["--host", broker.host, "--port", str(broker.port), "-t", f"{ROOT}/cam1/#",
                                  "--count", "3", "--duration", "10", "--no-retained"]
                                 + (["--json"] if json_mode else []))
        rc: list[int] = []

        def tail(a: argparse.Namespace = args, o: io.StringIO = out, r: list[int] = rc) -> None:
            r.append(run_mqtt_tail(a, o))

        t = threading.Thread(target=tail)
        t.start()
        time.sleep(0.6)
        for seq in range(3):
            pub.publish_result(make_result("cam1", seq, boxes=1))
        t.join(15)
        assert rc == [0]
        lines = out.getvalue().splitlines()
        assert len(lines) == 3
        if json_mode:
            assert [json.loads(line)["payload"]["seq"] for line in lines] == [0, 1, 2]
        else:
            assert "cam1 #0 1 boxes" in lines[0] and "person:" in lines[0]
    pub.close(5)
    bad = parser.parse_args(["--host", "127.0.0.1", "--port", "1", "--connect-timeout", "0.5"])
    assert run_mqtt_tail(bad, io.StringIO()) == 1
