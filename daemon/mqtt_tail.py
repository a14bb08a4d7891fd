"""`deltayolo mqtt-tail`: subscribe to what the box publishes and print it readably (JSON tree and Sparkplug B).

With ``--config`` the broker, credentials, TLS and topic root come from the daemon's own config; otherwise from
the flags. ``--json`` prints one JSON object per message (Sparkplug payloads decoded) for scripts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.config.mqtt import MqttConfig
from daemon.publish import sparkplug
from daemon.publish.link import configure_auth, load_credentials
from daemon.publish.topics import SparkplugTopics, Topics, default_group_id

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", type=Path, help="daemon config: broker, credentials and topics from outputs.mqtt")
    p.add_argument("--host", default=None, help="broker host (default: from --config, else localhost)")
    p.add_argument("--port", type=int, default=None, help="broker port (default 1883, 8883 with TLS)")
    p.add_argument("--protocol", choices=("3.1.1", "5"), default=None, help="MQTT version")
    p.add_argument("--username", default=None, help="user name")
    p.add_argument("--password-env", default=None, help="environment variable holding the password")
    p.add_argument("--password-file", type=Path, default=None, help="file holding the password")
    p.add_argument("--ca-file", type=Path, default=None, help="CA file: turns TLS on")
    p.add_argument("--cert-file", type=Path, default=None, help="client certificate (mutual TLS)")
    p.add_argument("--key-file", type=Path, default=None, help="client key (mutual TLS)")
    p.add_argument("--tls", action="store_true", help="TLS with the system CA store")
    p.add_argument("--insecure", action="store_true", help="TLS without the host name check")
    p.add_argument("--topic", "-t", action="append", default=None,
                   help="topic filter (repeatable); default: the node's tree from --config, else '#'")
    p.add_argument("--count", "-n", type=int, default=0, help="exit after this many messages (0: no limit)")
    p.add_argument("--duration", type=float, default=0.0, help="exit after this many seconds (0: no limit)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--no-retained", action="store_true", help="skip retained messages (only what is new)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="give up if not connected by then")


def _config_from_args(args: argparse.Namespace) -> tuple[MqttConfig, list[str]]:
    """The MQTT settings and topic filters to use, from --config and/or flags."""
    base: dict[str, Any] = {}
    filters: list[str] = ["#"]
    if args.config is not None:
        from daemon.config.loader import load_config

        cfg = load_config(args.config)
        if cfg.outputs.mqtt is None:
            raise ValueError(f"{args.config}: outputs.mqtt is not configured")
        base = cfg.outputs.mqtt.model_dump(exclude_none=True)
        n = cfg.node
        filters = [Topics(n.site, n.area, n.line, n.node).everything_filter]
        m = cfg.outputs.mqtt
        if m.format in ("sparkplug", "both"):
            sp = SparkplugTopics(m.sparkplug.group_id or default_group_id(n.site, n.area, n.line),
                                 m.sparkplug.edge_node_id or n.node)
            filters = ([] if m.format == "sparkplug" else filters) + [sp.group_filter]
    flags = {"host": args.host, "port": args.port, "protocol": args.protocol, "username": args.username,
             "password_env": args.password_env, "password_file": args.password_file}
    for key, value in flags.items():
        if value is not None:
            base[key] = value
    if args.password_env is not None:
        base.pop("password_file", None)
    if args.password_file is not None:
        base.pop("password_env", None)
    if args.ca_file is not None or args.tls or args.cert_file is not None or args.insecure:
        tls = dict(base.get("tls") or {})
        for key in ("ca_file", "cert_file", "key_file"):
            if getattr(args, key) is not None:
                tls[key] = getattr(args, key)
        tls["insecure"] = bool(args.insecure or tls.get("insecure", False))
        base["tls"] = tls
    base.pop("client_id", None)
    return MqttConfig.model_validate(base), (args.topic or filters)


def _ts(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def summarize(topic: str, payload: bytes) -> str:
    """One readable line for a message of ours; anything else is shown as text or hex."""
    if sparkplug.is_sparkplug_topic(topic):
        try:
            p = sparkplug.decode(payload)
        except Exception:
            return f"(undecodable Sparkplug payload, {len(payload)} bytes)"
        return f"seq={p.seq if p.HasField('seq') else '-'} " + ", ".join(_metric_text(m) for m in p.metrics)
    try:
        d = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return payload[:80].hex() + (" ..." if len(payload) > 80 else "") + f" ({len(payload)} bytes)"
    if not isinstance(d, dict):
        return json.dumps(d)[:200]
    return _json_text(d)


def _json_text(d: dict[str, Any]) -> str:
    kind = d.get("kind")
    if kind == "detections":
        boxes = " ".join(f"{b['class']}:{b['score']:.2f}@({b['x1']:.0f},{b['y1']:.0f},{b['x2']:.0f},{b['y2']:.0f})"
                         for b in d.get("boxes", [])[:8])
        more = f" +{d['count'] - 8}" if d.get("count", 0) > 8 else ""
        lat = (d["publish_time"] - d["capture_time"]) * 1000 if d.get("publish_time") and d.get("capture_time") else 0
        cached = f" cached {d['cache_age_s']:.1f}s" if d.get("cached") else ""
        return f"{d['camera']} #{d['seq']} {d['count']} boxes{cached} ({lat:.0f} ms) {boxes}{more}"
    if kind == "stats":
        bw = d.get("bandwidth", {})
        return (f"fps {d.get('fps')} p99 {d.get('latency_p99_ms')} ms, in {(bw.get('bytes_in_per_s') or 0) / 1e6:.2f}"
                f" MB/s, h2d {(bw.get('bytes_h2d_per_s') or 0) / 1e6:.2f} MB/s, {len(d.get('cameras', []))} cameras,"
                f" backend {d.get('backend')}")
    if kind == "status":
        return f"node {d['state'].upper()}{'' if d.get('clean', True) else ' (last will)'} {d.get('software', '')}"
    if kind in ("camera_state", "availability"):
        return f"{d['camera']} {d['state']} {d.get('detail', '')}".rstrip()
    if kind == "cmd_ack":
        return f"ack {d['command']} {d.get('camera') or ''} id={d.get('id')} {'OK' if d['ok'] else 'REFUSED'}: " \
               f"{d['message']}"
    if kind == "frame_error":
        return f"{d['camera']} #{d['seq']} {d['error']}: {d['message']}"
    return json.dumps(d, separators=(",", ":"))[:300]


def _metric_text(m: Any) -> str:
    which = m.WhichOneof("value")
    if m.is_null or which is None:
        value: object = "null"
    elif which == "dataset_value":
        value = f"<{len(m.dataset_value.rows)} rows>"
    else:
        value = getattr(m, which)
    return f"{m.name}={value}"


def _metric_dict(m: Any) -> dict[str, Any]:
    which = m.WhichOneof("value")
    value: Any = None
    if which == "dataset_value":
        ds = m.dataset_value
        value = {"columns": list(ds.columns), "rows": [
            [getattr(e, e.WhichOneof("value")) if e.WhichOneof("value") else None for e in row.elements]
            for row in ds.rows]}
    elif which is not None and not m.is_null:
        value = getattr(m, which)
    return {"name": m.name, "datatype": m.datatype, "timestamp": m.timestamp, "value": value,
            "historical": m.is_historical}


def as_json(topic: str, payload: bytes, retain: bool, qos: int) -> dict[str, Any]:
    out: dict[str, Any] = {"time": time.time(), "topic": topic, "retain": retain, "qos": qos}
    if sparkplug.is_sparkplug_topic(topic):
        try:
            p = sparkplug.decode(payload)
        except Exception:
            out["payload_hex"] = payload.hex()
            return out
        out["sparkplug"] = {
            "timestamp": p.timestamp, "seq": p.seq if p.HasField("seq") else None,
            "metrics": [_metric_dict(m) for m in p.metrics],
        }
        return out
    try:
        out["payload"] = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        out["payload_hex"] = payload.hex()
    return out


class _Printer:
    """Prints each message (readable line or JSON) and says when --count is reached."""

    def __init__(self, stream: TextIO, as_json_lines: bool, skip_retained: bool, count: int,
                 done: threading.Event) -> None:
        self._stream = stream
        self._json = as_json_lines
        self._skip_retained = skip_retained
        self._count = count
        self._done = done
        self.seen = 0

    def show(self, msg: paho.MQTTMessage) -> None:
        try:
            if self._skip_retained and msg.retain:
                return
            payload = bytes(msg.payload)
            if self._json:
                self._stream.write(json.dumps(as_json(msg.topic, payload, bool(msg.retain), msg.qos)) + "\n")
            else:
                flag = " [retained]" if msg.retain else ""
                self._stream.write(f"{_ts(time.time())} {msg.topic}{flag}  {summarize(msg.topic, payload)}\n")
            self._stream.flush()
            self.seen += 1
            if self._count and self.seen >= self._count:
                self._done.set()
        except Exception:
            log.exception("mqtt-tail: printing a message on %s failed", msg.topic)


def run_mqtt_tail(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Subscribe and print until --count/--duration or Ctrl-C. 0 when done, 1 when it could not connect."""
    stream = out or sys.stdout
    try:
        cfg, filters = _config_from_args(args)
        creds = load_credentials(cfg, os.environ)
    except Exception as exc:
        print(f"mqtt-tail: {exc}", file=sys.stderr)
        return 1
    v5 = cfg.protocol == "5"
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"deltayolo-tail-{os.getpid()}",
                         protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311)
    configure_auth(client, cfg, creds)
    done = threading.Event()
    connected = threading.Event()
    printer = _Printer(stream, args.json, args.no_retained, args.count, done)

    def on_connect(c: paho.Client, _u: object, _f: object, reason: Any, _p: object) -> None:
        if reason.is_failure:
            print(f"mqtt-tail: broker refused the connection: {reason}", file=sys.stderr)
            done.set()
            return
        connected.set()
        for f in filters:
            c.subscribe(f, 1)

    def on_message(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        printer.show(msg)

    client.on_connect = on_connect
    client.on_message = on_message
    client.connect_async(cfg.host, cfg.effective_port, cfg.keepalive_s)
    client.loop_start()
    try:
        if not connected.wait(args.connect_timeout) and not done.is_set():
            print(f"mqtt-tail: could not connect to {cfg.host}:{cfg.effective_port} in {args.connect_timeout:g} s",
                  file=sys.stderr)
            return 1
        if not connected.is_set():
            return 1
        done.wait(args.duration if args.duration > 0 else None)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
    return 0
