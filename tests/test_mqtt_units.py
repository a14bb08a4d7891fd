"""Pure parts of the MQTT output: topics, payloads against the shipped JSON Schema, commands (and fuzzing),
the spool, config and credentials, Sparkplug encoding."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from pathlib import Path

import jsonschema
import pytest
from mosquitto import make_result
from pydantic import ValidationError

from daemon.config.mqtt import MqttConfig
from daemon.publish import payloads, sparkplug
from daemon.publish.commands import (
    CommandAck,
    CommandDispatcher,
    CommandLimits,
    CommandOutcome,
    CommandRejected,
    Rebirth,
    RequestKeyframe,
    SetCameraEnabled,
    SetDelta,
    SetThresholds,
    json_depth,
    parse_command,
)
from daemon.publish.commands import default_delta_validator as delta_ok
from daemon.publish.link import Secret, load_credentials
from daemon.publish.spool import Spool, SpoolError, SpoolRecord
from daemon.publish.topics import SparkplugTopics, Topics
from daemon.stats.model import CameraStats, NodeStats
from daemon.types import FrameError

T = Topics("plant-7", "smt", "line-3", "aoi-box-2")
ROOT = "plant-7/smt/line-3/deltayolo/aoi-box-2"
LIMITS = CommandLimits()


# -- topics -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("built", "expected"), [
    (T.root, ROOT),
    (T.status, f"{ROOT}/status"),
    (T.stats, f"{ROOT}/stats"),
    (T.ack, f"{ROOT}/ack"),
    (T.detections("cam_1"), f"{ROOT}/cam_1/detections"),
    (T.errors("cam-2"), f"{ROOT}/cam-2/errors"),
    (T.state("c"), f"{ROOT}/c/state"),
    (T.availability("c"), f"{ROOT}/c/availability"),
    (T.commands_filter, f"{ROOT}/cmd/#"),
    (T.command("rebirth"), f"{ROOT}/cmd/rebirth"),
    (T.command("keyframe", "c"), f"{ROOT}/cmd/c/keyframe"),
    (SparkplugTopics("g:a", "n1").node("NBIRTH"), "spBv1.0/g:a/NBIRTH/n1"),
    (SparkplugTopics("g", "n1").device("DDATA", "cam"), "spBv1.0/g/DDATA/n1/cam"),
])
def test_topics(built: str, expected: str) -> None:
    assert built == expected


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "x" * 65, "caméra"])
def test_topic_elements_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="not topic-safe"):
        T.detections(bad)


@pytest.mark.parametrize(("topic", "verb", "camera"), [
    (f"{ROOT}/cmd/rebirth", "rebirth", None),
    (f"{ROOT}/cmd/cam1/set_thresholds", "set_thresholds", "cam1"),
    (f"{ROOT}/cmd/rebirth/keyframe", "keyframe", "rebirth"),
])
def test_parse_command_topic(topic: str, verb: str, camera: str | None) -> None:
    ct = T.parse_command(topic)
    assert (ct.verb, ct.camera) == (verb, camera)


@pytest.mark.parametrize("topic", [f"{ROOT}/cmd/cam1/explode", f"{ROOT}/cmd/", f"{ROOT}/cmd/a/b/c",
                                   "other/cmd/rebirth", f"{ROOT}/cmd/bad cam/enable"])
def test_unknown_command_topics(topic: str) -> None:
    with pytest.raises(ValueError):
        T.parse_command(topic)


# -- payloads against the schema --------------------------------------------------------------------------------
def _stats() -> NodeStats:
    cam = CameraStats("cam1", True, 100, 98, 2, 0, 0, 1, 29.9, 31.0, 55.5, 120, 10**7, 10**8, 0, 0)
    return NodeStats(1.7e9, 5.0, 60.0, "cpu:onnxruntime", "no GPU", 29.9, 31.0, float("nan"), 2e6, 3e7, 0.0, 0.0,
                     (("decode", 4.1), ("infer", 20.3)), (cam,))


def _all_payloads() -> list[dict[str, object]]:
    return [
        payloads.detections_payload(make_result("cam1", 7, boxes=3)),
        payloads.detections_payload(make_result("cam1", 8, boxes=0)),
        payloads.frame_error_payload(FrameError("cam1", 9, "corrupt", "JPEG truncated")),
        payloads.stats_payload(_stats()),
        payloads.camera_state_payload("cam1", "streaming", ""),
        payloads.availability_payload("cam1", False),
        payloads.status_payload(True, "cid", "deltayolo 0.1.0", clean=True),
        payloads.ack_payload("set_thresholds", "cam1", "req-1", True, "applied"),
        payloads.ack_payload("unknown", None, None, False, "bad"),
    ]


def test_every_payload_kind_validates_against_the_shipped_schema() -> None:
    schema = payloads.load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    kinds = set()
    for p in _all_payloads():
        decoded = json.loads(payloads.encode(p))  # what goes on the wire (NaN -> null)
        errors = list(validator.iter_errors(decoded))
        assert not errors, (p["kind"], [e.message for e in errors])
        kinds.add(p["kind"])
    assert kinds == {"detections", "frame_error", "stats", "camera_state", "availability", "status", "cmd_ack"}


def test_schema_rejects_drift() -> None:
    validator = jsonschema.Draft202012Validator(payloads.load_schema())
    p = payloads.detections_payload(make_result("cam1", 1))
    assert not validator.is_valid({**p, "surprise": 1})
    assert not validator.is_valid({**p, "v": 2})
    del p["capture_time"]
    assert not validator.is_valid(p)


def test_detection_payload_content() -> None:
    r = make_result("cam1", 42, boxes=2, capture_time=1000.0)
    p = payloads.detections_payload(r, now=1000.25)
    assert (p["camera"], p["seq"], p["capture_time"], p["publish_time"], p["count"]) == ("cam1", 42, 1000.0,
                                                                                         1000.25, 2)
    assert p["boxes"][0] == {"class_id": 0, "class": "person", "score": pytest.approx(0.58), "x1": 10.0,
                             "y1": 20.0, "x2": 110.5, "y2": 220.2, "cached": False, "age_s": 0.0}
    assert p["cached"] is False and p["width"] == 1280
    s = payloads.stats_payload(_stats())
    assert s["latency_p99_ms"] is None and s["bandwidth"]["bytes_in_per_s"] == 2e6


# -- commands ---------------------------------------------------------------------------------------------------
def _parse(verb_topic: str, body: bytes) -> object:
    return parse_command(T, f"{ROOT}/cmd/{verb_topic}", body, LIMITS, delta_ok)


@pytest.mark.parametrize(("topic", "body", "expected"), [
    ("cam1/set_thresholds", b'{"confidence": 0.4, "iou": 0.6, "id": "r1"}', SetThresholds("cam1", 0.4, 0.6, "r1")),
    ("cam1/set_thresholds", b'{"iou": 1}', SetThresholds("cam1", None, 1.0)),
    ("cam1/enable", b"", SetCameraEnabled("cam1", True)),
    ("cam1/disable", b"{}", SetCameraEnabled("cam1", False)),
    ("cam1/keyframe", b'{"id": "k"}', RequestKeyframe("cam1", "k")),
    ("rebirth", b"  ", Rebirth()),
])
def test_valid_commands(topic: str, body: bytes, expected: object) -> None:
    assert _parse(topic, body) == expected


def test_set_delta_goes_through_the_validator() -> None:
    cmd = _parse("cam1/set_delta", b'{"enabled": false}')
    assert isinstance(cmd, SetDelta) and dict(cmd.settings) == {"enabled": False}
    with pytest.raises(TypeError):
        cmd.settings["enabled"] = True  # type: ignore[index]
    seen = []

    def custom(m: object) -> dict[str, object]:
        seen.append(m)
        return {"enabled": True, "threshold": 3}

    cmd2 = parse_command(T, f"{ROOT}/cmd/c/set_delta", b'{"threshold": 3}', LIMITS, custom)
    assert isinstance(cmd2, SetDelta) and cmd2.settings["threshold"] == 3 and seen == [{"threshold": 3}]


@pytest.mark.parametrize(("topic", "body", "reason"), [
    ("cam1/set_thresholds", b'{"confidence": "0.5"}', "confidence must be a number, got \"0.5\" (str)"),
    ("cam1/set_thresholds", b'{"confidence": true}', "must be a number"),
    ("cam1/set_thresholds", b'{"confidence": 1.5}', "must be in (0, 1], got 1.5"),
    ("cam1/set_thresholds", b'{"confidence": 0}', "must be in (0, 1]"),
    ("cam1/set_thresholds", b'{"confidence": NaN}', "NaN is not a valid JSON number"),
    ("cam1/set_thresholds", b'{}', "needs confidence and/or iou"),
    ("cam1/set_thresholds", b'{"conf": 0.5}', "unknown keys ['conf']"),
    ("cam1/set_thresholds", b'{"iou": 0.5, "iou": 0.6}', "key 'iou' appears twice"),
    ("cam1/set_delta", b'{"enabled": "yes"}', "enabled must be true or false"),
    ("cam1/set_delta", b'{"mode": 1}', "unknown delta settings ['mode']"),
    ("cam1/enable", b'{"now": true}', "enable takes no parameters besides id"),
    ("cam1/keyframe", b'[1, 2]', "must be a JSON object, got list"),
    ("cam1/keyframe", b'"x"', "must be a JSON object, got str"),
    ("cam1/keyframe", b'{"id": 5}', "id must be a string"),
    ("cam1/keyframe", b'{"id": "' + b"x" * 65 + b'"}', "id must be a string"),
    ("cam1/keyframe", b'{bad json', "not valid JSON"),
    ("cam1/keyframe", b'\xff\xfe', "not UTF-8"),
    ("cam1/keyframe", b'{"a": ' * 9 + b"1" + b"}" * 9, "nesting depth 9 exceeds the limit of 8"),
    ("cam1/keyframe", b" " * 65537, "payload of 65537 bytes exceeds the limit of 65536"),
    ("cam1/launch", b"{}", "unknown command topic"),
    ("rebirth", b'{"now": 1}', "rebirth takes no parameters"),
])
def test_invalid_commands_are_rejected_with_a_reason(topic: str, body: bytes, reason: str) -> None:
    with pytest.raises(CommandRejected) as exc:
        _parse(topic, body)
    assert reason in str(exc.value)


def test_json_depth_skips_strings() -> None:
    assert json_depth('{"a": "[[[[{{{{", "b": [1, {"c": []}]}') == 4
    assert json_depth('"\\"[[["') == 0


class _Handler:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def handle(self, cmd: object) -> CommandOutcome:
        self.seen.append(cmd)
        if isinstance(cmd, RequestKeyframe):
            raise RuntimeError("engine busy")
        return CommandOutcome(True, "done")


def _fuzz_cases(rng: random.Random) -> list[bytes]:
    cases = [bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300))) for _ in range(400)]
    values: list[object] = [None, 1, 1.5, "s", [], [1, "a"], True, {"confidence": None}, {"confidence": []},
                            {"confidence": {"x": 1}}, {"iou": -1}, {"iou": 1e309}, {"id": None, "iou": 0.5},
                            {"": 1}, {"confidence": 0.5, "iou": "0.5"}, {"enabled": 1}, {"id": ["x"]}]
    cases += [json.dumps(v).encode() for v in values]
    cases += [b"{" * 100_000, b"[" * 60_000 + b"]" * 60_000, b'{"a":' * 5000 + b"1" + b"}" * 5000,
              b"x" * (1 << 20), b'{"confidence": ' + b"9" * 60_000 + b"}", b"\x00" * 100,
              "{\"confidence\": \"\ud800\"}".encode("utf-8", "surrogatepass"), b'{"iou": 0.5}garbage',
              b"-Infinity", b"{\"a\": \"" + b"\\u0000" * 1000 + b"\"}"]
    return cases


def test_fuzzed_command_payloads_never_crash_and_are_rejected_with_reasons() -> None:
    rng = random.Random(7)
    handler = _Handler()
    acks: list[CommandAck] = []
    rebirths: list[int] = []
    d = CommandDispatcher(T, handler, LIMITS, 8, acks.append, lambda: rebirths.append(1))
    topics = [f"{ROOT}/cmd/cam1/set_thresholds", f"{ROOT}/cmd/cam1/set_delta", f"{ROOT}/cmd/cam1/enable",
              f"{ROOT}/cmd/rebirth", f"{ROOT}/cmd/cam1/bogus", f"{ROOT}/cmd/" + "a" * 5000]
    cases = _fuzz_cases(rng)
    for i, body in enumerate(cases):
        ack = d.run_one(topics[i % len(topics)], body)
        assert ack.message, body[:50]
        if not ack.ok:
            assert len(ack.message) < 400
    assert len(acks) == len(cases)
    rejected = [a for a in acks if not a.ok]
    assert d.counters.rejected == len(rejected) >= len(cases) - 10
    # a handler that raises is an answer too, not a crash
    ack = d.run_one(f"{ROOT}/cmd/cam1/keyframe", b"{}")
    assert not ack.ok and "handler error: RuntimeError: engine busy" in ack.message
    ok = d.run_one(f"{ROOT}/cmd/cam1/set_thresholds", b'{"confidence": 0.3, "id": "a1"}')
    assert ok.ok and ok.request_id == "a1" and ok.camera == "cam1" and handler.seen[-1] == SetThresholds(
        "cam1", 0.3, None, "a1")


# -- spool ------------------------------------------------------------------------------------------------------
def _rec(order: int, kind: str = "detections", size: int = 10) -> SpoolRecord:
    return SpoolRecord(order, kind, f"t/{kind}", bytes([order % 256]) * size, 1, kind == "camera_state")


def test_spool_keeps_order_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    s = Spool(path, 1000, 1 << 20)
    s.open()
    s.append([_rec(5), _rec(3), _rec(9, "camera_state")])
    s.append([_rec(4)])
    assert [r.order for r in s.read_after(0, 10)] == [3, 4, 5, 9]
    assert [r.order for r in s.read_after(4, 1)] == [5]
    s.delete([3, 4, 77])
    assert s.counters.messages == 2 and s.counters.bytes == 20
    s.set_meta("k", "v")
    s.close()
    s2 = Spool(path, 1000, 1 << 20)
    s2.open()
    got = s2.read_after(0, 10)
    assert [r.order for r in got] == [5, 9] and got[1].retain and got[1].kind == "camera_state"
    assert s2.get_meta("k") == "v" and s2.last_order == 9
    with pytest.raises(SpoolError, match="in use by another process"):
        Spool(path, 1000, 1 << 20).open()
    s2.close()


def test_spool_full_drops_oldest_detections_first_never_state(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", max_messages=5, max_bytes=1 << 20)
    s.open()
    s.append([_rec(1, "camera_state"), _rec(2, "detections"), _rec(3, "frame_error"), _rec(4, "detections"),
              _rec(5, "stats")])
    s.append([_rec(6, "detections"), _rec(7, "camera_state")])
    assert [r.order for r in s.read_after(0, 10)] == [1, 3, 5, 6, 7]
    s.append([_rec(8, "camera_state"), _rec(9, "camera_state")])
    assert [r.order for r in s.read_after(0, 10)] == [1, 5, 7, 8, 9]
    assert s.counters.dropped == {"detections": 3, "frame_error": 1}
    s.append([_rec(10, "camera_state")])  # only state left to drop: state is never dropped, the bound yields
    assert [r.order for r in s.read_after(0, 10)] == [1, 7, 8, 9, 10]
    assert s.counters.dropped == {"detections": 3, "frame_error": 1, "stats": 1}
    s.close()


def test_spool_drop_newest_and_byte_bound(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", max_messages=100, max_bytes=1 << 16, on_full="drop_newest")
    s.open()
    s.append([_rec(i, size=20_000) for i in range(1, 6)])
    assert [r.order for r in s.read_after(0, 10)] == [1, 2, 3]
    assert s.counters.dropped == {"detections": 2} and s.counters.bytes == 60_000
    s.close()


def test_corrupt_spool_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    s = Spool(path, 100, 1 << 20)
    s.open()
    assert s.counters.recovered_corrupt == 1 and s.counters.messages == 0
    assert list(tmp_path.glob("s.sqlite.corrupt-*"))
    s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# -- config and credentials -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("data", "message"), [
    ({"tls": {"cert_file": "/c.pem"}}, "cert_file and tls.key_file go together"),
    ({"password_env": "X"}, "a password needs a user name"),
    ({"username": "u", "password_env": "X", "password_file": "/p"}, "not both"),
    ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "reconnect_max_s (1.0) must be >= reconnect_min_s"),
    ({"qos": {"detections": 3}}, "less than or equal to 2"),
    ({"port": 0}, "greater than or equal to 1"),
    ({"hots": "x"}, "Extra inputs are not permitted"),
    ({"password_env": "1BAD", "username": "u"}, "String should match pattern"),
])
def test_config_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MqttConfig.model_validate(data)


def test_config_defaults() -> None:
    c = MqttConfig()
    assert (c.effective_port, c.protocol, c.qos.detections, c.clean_session, c.format) == (1883, "3.1.1", 1, False,
                                                                                           "json")
    assert MqttConfig.model_validate({"tls": {}}).effective_port == 8883
    for name, field in MqttConfig.model_fields.items():
        assert field.description, name


def test_credentials_from_env_and_file_never_shown(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret-file\nignored\n")
    c = load_credentials(MqttConfig(username="u", password_file=pw), {})
    assert c.username == "u" and c.password is not None and c.password.reveal() == "s3cret-file"
    assert "s3cret" not in repr(c) and "s3cret" not in str(c.password)
    c2 = load_credentials(MqttConfig.model_validate({"username_env": "MQ_USER", "password_env": "MQ_PW"}),
                          {"MQ_USER": "env-user", "MQ_PW": "env-pw"})
    assert (c2.username, c2.password.reveal() if c2.password else None) == ("env-user", "env-pw")
    with pytest.raises(ValueError, match="environment variable MQ_PW is not set"):
        load_credentials(MqttConfig.model_validate({"username": "u", "password_env": "MQ_PW"}), {})
    with pytest.raises(ValueError, match="cannot read"):
        load_credentials(MqttConfig(username="u", password_file=tmp_path / "missing"), {})
    assert repr(Secret("x")) == "Secret('***')"


# -- Sparkplug encoding -----------------------------------------------------------------------------------------
def test_sparkplug_stamp_and_historical(tmp_path: Path) -> None:
    s = Spool(tmp_path / "s.sqlite", 100, 1 << 20)
    s.open()
    sess = sparkplug.SparkplugSession(SparkplugTopics("g", "n"), s, 0, "deltayolo test")
    topic, body = sess.ddata_result(make_result("cam1", 5, boxes=2, capture_time=1000.0))
    assert topic == "spBv1.0/g/DDATA/n/cam1"
    live = sparkplug.decode(sparkplug.stamp(body, 200, historical=False))
    assert live.seq == 200 and not any(m.is_historical for m in live.metrics)
    metrics = {m.name: m for m in live.metrics}
    assert metrics["Frame/Seq"].long_value == 5 and metrics["Frame/Capture Time"].long_value == 1_000_000
    assert metrics["Detections/Count"].int_value == 2
    ds = metrics["Detections"].dataset_value
    assert list(ds.columns) == ["class_id", "class", "score", "x1", "y1", "x2", "y2"] and len(ds.rows) == 2
    assert ds.rows[0].elements[1].string_value == "person"
    assert math.isclose(ds.rows[0].elements[5].float_value, 110.5)
    old = sparkplug.decode(sparkplug.stamp(body, 3, historical=True))
    assert old.seq == 3 and all(m.is_historical for m in old.metrics)
    # bdSeq: 0 on the first connect, +1 per connect, persisted, wraps at 256
    assert [sparkplug.decode(sess.next_will()[1]).metrics[0].long_value for _ in range(3)] == [0, 1, 2]
    s.set_meta("sparkplug_bdseq", "255")
    sess2 = sparkplug.SparkplugSession(SparkplugTopics("g", "n"), s, 0, "x")
    assert sparkplug.decode(sess2.next_will()[1]).metrics[0].long_value == 0
    s.close()


def test_sparkplug_rebirth_request_detection() -> None:
    p = sparkplug.pb.Payload()
    m = p.metrics.add()
    m.name, m.datatype, m.boolean_value = sparkplug.REBIRTH, sparkplug.DT.Boolean, True
    assert sparkplug.is_rebirth_request(p.SerializeToString())
    m.boolean_value = False
    assert not sparkplug.is_rebirth_request(p.SerializeToString())


def test_publisher_calls_never_raise_before_start_or_after_close(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from daemon.publish.mqtt import MqttPublisher

    cfg = MqttConfig.model_validate({"host": "127.0.0.1", "port": 1, "spool": {"path": str(tmp_path / "s.db")}})
    pub = MqttPublisher(cfg, SimpleNamespace(site="s", area="a", line="l", node="n"))
    pub.publish_result(make_result("cam1", 1))  # not started: counted, not raised
    pub.publish_camera_state("cam1", "streaming", "")
    assert pub.counters().encode_errors == 2
    pub.start()  # the broker is unreachable: start still succeeds, messages wait in the spool
    pub.publish_result(make_result("cam1", 2))
    pub.close(0.5)
    pub.publish_result(make_result("cam1", 3))
    pub.publish_stats(_stats())
    c = pub.counters()
    assert c.encode_errors == 2 and not c.connected
    s = Spool(tmp_path / "s.db", 100, 1 << 20)
    s.open()
    assert [json.loads(r.payload)["seq"] for r in s.read_after(0, 10) if r.kind == "detections"] == [2]
    s.close()


def test_detections_and_frame_errors_carry_this_runs_id() -> None:
    """seq restarts at 0 when a daemon restarts and a durable spool replays a killed run's messages after it, so
    (camera, run, seq) is what identifies a message; the run id is this process's, in every such payload."""
    validator = jsonschema.Draft202012Validator(payloads.load_schema())
    det = payloads.detections_payload(make_result("cam1", 0))
    err = payloads.frame_error_payload(FrameError("cam1", 0, "corrupt", "bad"))
    assert det["run"] == err["run"] == payloads.RUN_ID
    assert len(payloads.RUN_ID) == 16 and int(payloads.RUN_ID, 16) >= 0
    assert not validator.is_valid({**det, "run": "not-hex"})
