"""The daemon publishing to a real mosquitto and obeying commands sent by a real paho client."""

from __future__ import annotations

import json
import time
from pathlib import Path

import paho.mqtt.client as paho
from mosquitto import Broker, Collector
from paho.mqtt.enums import CallbackAPIVersion

from daemon.app import Runtime
from daemon.config.loader import parse_config
from daemon.run import _attach_mqtt

ROOT = "plant/smt/l1/deltayolo/box"


def test_detections_flow_and_commands_are_applied(tmp_path: Path, model_path: Path, vtest_path: Path) -> None:
    broker = Broker(tmp_path / "broker")
    broker.start()
    collector = Collector(broker, ["plant/#"]).start()
    cfg = parse_config(
        "version: 1\nnode: {site: plant, area: smt, line: l1, node: box}\n"
        f"model: {{path: {model_path}}}\ncameras:\n"
        f"  - id: cam1\n    source: {{type: replay, path: {vtest_path}, fps: 5, loop: true}}\n"
        "delta: {enabled: true}\nstats: {interval_s: 1}\n"
        f"outputs: {{mqtt: {{host: 127.0.0.1, port: {broker.port}, spool: {{path: {tmp_path / 'spool.sqlite'}}}}}}}\n"
    )
    rt = Runtime(cfg)
    _attach_mqtt(cfg, rt)
    rt.start()
    sender = paho.Client(CallbackAPIVersion.VERSION2, client_id="mes")
    try:
        assert collector.wait_for(lambda: len(collector.on("/cam1/detections")) >= 5, 60)
        det = json.loads(collector.on("/cam1/detections")[0])
        assert det["camera"] == "cam1" and "boxes" in det
        assert collector.wait_for(lambda: bool(collector.on("/stats")), 10)
        sender.connect("127.0.0.1", broker.port)
        sender.loop_start()
        sender.publish(f"{ROOT}/cmd/cam1/set_thresholds", json.dumps({"confidence": 0.6, "id": "r1"}), qos=1)
        sender.publish(f"{ROOT}/cmd/cam1/keyframe", json.dumps({"id": "r2"}), qos=1)
        sender.publish(f"{ROOT}/cmd/cam1/set_delta", json.dumps({"enabled": True, "tile": 33}), qos=1)
        assert collector.wait_for(lambda: len(collector.on("/ack")) >= 3, 10)
        acks = {a.get("id"): a for a in map(json.loads, collector.on("/ack"))}
        assert acks["r1"]["ok"] is True
        assert acks["r2"]["ok"] is True
        bad = [a for a in acks.values() if not a["ok"]]
        assert bad and "tile" in json.dumps(bad[0])
        assert rt.settings.get("cam1") is not None and rt.settings.get("cam1").confidence == 0.6  # type: ignore[union-attr]
        n = len(collector.on("/cam1/detections"))
        time.sleep(2.0)
        later = [json.loads(p) for p in collector.on("/cam1/detections")[n:]]
        assert later and all(b["score"] > 0.6 for d in later for b in d["boxes"] if not b.get("cached"))
    finally:
        sender.loop_stop()
        rt.stop(10)
        collector.client.loop_stop()
        broker.stop()
