"""MqttPublisher: the Publisher protocol over MQTT (JSON topic tree and/or Sparkplug B) with store-and-forward.

Threads: the caller's (publish_* only encode and enqueue: never blocks for long, never raises), ``mqtt-send``
(ordered delivery, spool), paho's network thread (callbacks, guarded), ``mqtt-cmd`` (commands).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import paho.mqtt.client as paho

from daemon import __version__
from daemon.config.mqtt import MqttConfig
from daemon.publish import payloads
from daemon.publish.commands import (
    CommandAck,
    CommandDispatcher,
    CommandHandler,
    CommandLimits,
    DeltaValidator,
    default_delta_validator,
)
from daemon.publish.link import Credentials, LinkEvents, PahoLink, Will, load_credentials
from daemon.publish.outbound import OutMessage, percentile
from daemon.publish.sender import Delivery
from daemon.publish.sparkplug import SparkplugSession, is_rebirth_request, is_sparkplug_topic
from daemon.publish.spool import Spool, default_spool_path
from daemon.publish.topics import SparkplugTopics, Topics, default_group_id
from daemon.stats.model import NodeStats
from daemon.types import FrameError, FrameResult

if TYPE_CHECKING:
    from daemon.config.model import Config

log = logging.getLogger(__name__)
SOFTWARE = f"deltayolo {__version__}"


class NodeNames(Protocol):
    """The ISA-95 path of this node (NodeConfig satisfies it)."""

    @property
    def site(self) -> str: ...
    @property
    def area(self) -> str: ...
    @property
    def line(self) -> str: ...
    @property
    def node(self) -> str: ...


@dataclass(frozen=True, slots=True)
class MqttCounters:
    """A snapshot for stats and /metrics."""

    connected: bool
    connects: int
    disconnects: int
    connect_failures: int
    refused: int
    callback_errors: int
    enqueued: int
    published: int
    acked: int
    spooled: int
    replayed: int
    spool_messages: int
    spool_bytes: int
    spool_dropped: int
    spool_commits: int
    dropped_overflow: int
    send_errors: int
    rejected_by_broker: int
    encode_errors: int
    commands_ok: int
    commands_failed: int
    commands_rejected: int
    ack_latency_p50_ms: float | None
    ack_latency_p99_ms: float | None


class _CameraBoard:
    """Last known state per camera (for births)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[str, tuple[str, str]] = {}

    def set(self, camera: str, state: str, detail: str) -> bool:
        """Record; True when the availability changed (or the camera is new)."""
        with self._lock:
            old = self._states.get(camera)
            if state == "removed":
                self._states.pop(camera, None)
            else:
                self._states[camera] = (state, detail)
        was = old is not None and old[0] in payloads.ONLINE_STATES
        return old is None or was != (state in payloads.ONLINE_STATES)

    def snapshot(self) -> dict[str, tuple[str, str]]:
        with self._lock:
            return dict(self._states)


class _Hooks:
    """Session hooks for the sender: JSON births (status, availability) and/or Sparkplug births and seq."""

    def __init__(self, pub: MqttPublisher) -> None:
        self._pub = pub

    def births(self) -> list[OutMessage]:
        p = self._pub
        out: list[OutMessage] = []
        if p.json_enabled:
            status = payloads.status_payload(True, p.client_id, SOFTWARE, clean=True)
            out.append(OutMessage(0, "status", p.topics.status, payloads.encode(status), p.cfg.qos.status, True))
            for cam, (state, detail) in sorted(p.cameras.snapshot().items()):
                st = payloads.camera_state_payload(cam, state, detail)
                av = payloads.availability_payload(cam, state in payloads.ONLINE_STATES)
                out.append(OutMessage(0, "camera_state", p.topics.state(cam), payloads.encode(st),
                                      p.cfg.qos.state, True))
                out.append(OutMessage(0, "availability", p.topics.availability(cam), payloads.encode(av),
                                      p.cfg.qos.state, True))
        if p.sparkplug is not None:
            out.extend(p.sparkplug.births())
        return out

    def prepare(self, msg: OutMessage, replay: bool) -> tuple[list[OutMessage], OutMessage | None]:
        if self._pub.sparkplug is not None and is_sparkplug_topic(msg.topic):
            return self._pub.sparkplug.prepare(msg, replay)
        return [], msg


class MqttPublisher:
    """Publishes results, errors, stats and camera states; survives broker outages and restarts losslessly."""

    def __init__(
        self,
        cfg: MqttConfig,
        node: NodeNames,
        handler: CommandHandler | None = None,
        validate_delta: DeltaValidator | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self._node = node
        self._handler = handler
        self._validate_delta = validate_delta or default_delta_validator
        self._environ = os.environ if environ is None else environ
        self.topics = Topics(node.site, node.area, node.line, node.node)
        self.client_id = cfg.client_id or f"deltayolo-{node.site}-{node.area}-{node.line}-{node.node}"
        self.json_enabled = cfg.format in ("json", "both")
        self.cameras = _CameraBoard()
        sp = cfg.sparkplug
        self._sp_topics = (
            SparkplugTopics(sp.group_id or default_group_id(node.site, node.area, node.line),
                            sp.edge_node_id or node.node)
            if cfg.format in ("sparkplug", "both") else None
        )
        self.sparkplug: SparkplugSession | None = None
        self.spool: Spool | None = None
        self._delivery: Delivery | None = None
        self._link: PahoLink | None = None
        self._dispatcher: CommandDispatcher | None = None
        self._encode_errors = 0
        self._closed = False

    # -- start ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the spool, connect (in the background: a broker that is down is retried) and start threads."""
        cfg = self.cfg
        creds: Credentials = load_credentials(cfg, self._environ)
        path = cfg.spool.path or default_spool_path(self._node.node, self._environ)
        self.spool = Spool(path, cfg.spool.max_messages, cfg.spool.max_bytes, cfg.spool.on_full, cfg.spool.fsync)
        self.spool.open()
        if self._sp_topics is not None:
            self.sparkplug = SparkplugSession(self._sp_topics, self.spool, cfg.sparkplug.data_qos, SOFTWARE)
        clean = cfg.clean_session or self.sparkplug is not None
        self._link = PahoLink(cfg, self.client_id, creds, self._link_events(), clean)
        self._delivery = Delivery(self.spool, self._link, _Hooks(self), cfg.max_inflight, cfg.max_pending,
                                  cfg.enqueue_timeout_s, durable=cfg.durable)
        if cfg.durable:
            log.info("mqtt: durable delivery: messages are committed to %s before they are sent (synchronous=%s)",
                     path, "FULL" if cfg.spool.fsync else "NORMAL")
        if cfg.commands.enabled:
            self._dispatcher = CommandDispatcher(
                self.topics, self._handler,
                CommandLimits(cfg.commands.max_payload_bytes, cfg.commands.max_depth),
                cfg.commands.queue_size, self._send_ack, self._delivery.rebirth, self._validate_delta,
            )
            self._dispatcher.start()
        self._delivery.start()
        self._link.start()

    def _link_events(self) -> LinkEvents:
        return LinkEvents(
            up=lambda gen: self._require_delivery().link_up(gen),
            down=lambda gen: self._require_delivery().link_down(gen),
            acked=lambda gen, mid, ok: self._require_delivery().acked(gen, mid, ok),
            message=self._on_message,
            subscriptions=self._subscriptions,
            next_will=self._next_will,
        )

    def _require_delivery(self) -> Delivery:
        if self._delivery is None:
            raise RuntimeError("MqttPublisher.start() was not called")
        return self._delivery

    def _subscriptions(self) -> list[tuple[str, int]]:
        subs: list[tuple[str, int]] = []
        if self._dispatcher is not None:
            subs.append((self.topics.commands_filter, self.cfg.qos.commands))
        if self._sp_topics is not None:
            subs.append((self._sp_topics.ncmd, self.cfg.qos.commands))
        return subs

    def _next_will(self) -> Will | None:
        if self.sparkplug is not None:
            topic, payload = self.sparkplug.next_will()
            return topic, payload, 1, False
        status = payloads.status_payload(False, self.client_id, SOFTWARE, clean=False)
        return self.topics.status, payloads.encode(status), self.cfg.qos.status, True

    # -- Publisher protocol -----------------------------------------------------------------------------------
    def publish_result(self, result: FrameResult) -> None:
        self._guarded(self._result, result)

    def publish_error(self, err: FrameError) -> None:
        self._guarded(self._error, err)

    def publish_stats(self, stats: NodeStats) -> None:
        if self.cfg.publish_stats:
            self._guarded(self._stats, stats)

    def publish_camera_state(self, camera: str, state: str, detail: str) -> None:
        self._guarded(self._camera_state, camera, state, detail)

    def _guarded(self, fn: Callable[..., None], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self._encode_errors += 1
            if self._encode_errors & (self._encode_errors - 1) == 0:
                log.exception("mqtt: encoding a message failed (%d so far)", self._encode_errors)

    def _enqueue(self, kind: str, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if self._delivery is None:
            raise RuntimeError("MqttPublisher.start() was not called")
        self._delivery.enqueue(kind, topic, payload, qos, retain)

    def _result(self, r: FrameResult) -> None:
        if not r.detections and not self.cfg.include_empty:
            return
        if self.json_enabled:
            body = payloads.encode(payloads.detections_payload(r))
            self._enqueue("detections", self.topics.detections(r.camera), body, self.cfg.qos.detections, False)
        if self.sparkplug is not None:
            topic, body = self.sparkplug.ddata_result(r)
            self._enqueue("detections", topic, body, self.cfg.sparkplug.data_qos, False)

    def _error(self, e: FrameError) -> None:
        if self.json_enabled:
            body = payloads.encode(payloads.frame_error_payload(e))
            self._enqueue("frame_error", self.topics.errors(e.camera), body, self.cfg.qos.errors, False)
        if self.sparkplug is not None:
            topic, body = self.sparkplug.ddata_error(e)
            self._enqueue("frame_error", topic, body, self.cfg.sparkplug.data_qos, False)

    def _stats(self, s: NodeStats) -> None:
        if self.json_enabled:
            self._enqueue("stats", self.topics.stats, payloads.encode(payloads.stats_payload(s)),
                          self.cfg.qos.stats, False)
        if self.sparkplug is not None:
            topic, body = self.sparkplug.ndata_stats(s)
            self._enqueue("stats", topic, body, self.cfg.sparkplug.data_qos, False)

    def _camera_state(self, camera: str, state: str, detail: str) -> None:
        changed = self.cameras.set(camera, state, detail)
        if self.json_enabled:
            q = self.cfg.qos.state
            body = payloads.encode(payloads.camera_state_payload(camera, state, detail))
            self._enqueue("camera_state", self.topics.state(camera), body, q, True)
            if changed:
                av = payloads.availability_payload(camera, state in payloads.ONLINE_STATES)
                self._enqueue("availability", self.topics.availability(camera), payloads.encode(av), q, True)
        if self.sparkplug is not None:
            topic, body = self.sparkplug.camera_state(camera, state, detail)
            self._enqueue("camera_state", topic, body, self.cfg.sparkplug.data_qos, False)

    def sync(self, timeout: float) -> bool:
        """Durable mode: block until everything published so far is committed to the spool (survives a kill)."""
        return self._delivery is not None and self._delivery.wait_committed(timeout)

    # -- commands ---------------------------------------------------------------------------------------------
    def _on_message(self, msg: paho.MQTTMessage) -> None:
        topic = msg.topic
        if self._sp_topics is not None and topic == self._sp_topics.ncmd:
            try:
                rebirth = is_rebirth_request(bytes(msg.payload))
            except Exception as exc:
                log.warning("mqtt: undecodable NCMD ignored: %s", exc)
                return
            if rebirth and self._delivery is not None:
                log.info("mqtt: Sparkplug NCMD rebirth")
                self._delivery.rebirth()
            return
        if self._dispatcher is None:
            return
        props = getattr(msg, "properties", None)
        response = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        if not isinstance(response, str) or not response or any(c in response for c in "+#") or len(response) > 512:
            response = None
        self._dispatcher.submit(topic, bytes(msg.payload), response,
                                bytes(correlation) if isinstance(correlation, bytes | bytearray) else None)

    def _send_ack(self, ack: CommandAck) -> None:
        body = payloads.encode(payloads.ack_payload(ack.command, ack.camera, ack.request_id, ack.ok, ack.message))
        self._enqueue("cmd_ack", self.topics.ack, body, self.cfg.qos.acks, False)
        if ack.response_topic is not None and self._link is not None:
            self._link.publish_now(ack.response_topic, body, self.cfg.qos.acks, False, ack.correlation)

    # -- close ------------------------------------------------------------------------------------------------
    def close(self, timeout: float) -> None:
        """Flush what the broker takes in time, keep the rest in the spool, say goodbye, disconnect."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + max(0.5, timeout)
        if self._dispatcher is not None:
            self._dispatcher.stop(min(1.0, timeout * 0.1))
        if self._delivery is not None:
            clean = self._delivery.close(max(0.1, (deadline - time.monotonic()) * 0.8))
            if not clean and self.spool is not None:
                log.warning("mqtt: %d messages stay in the spool %s for the next start",
                            self.spool.counters.messages, self.spool.path)
        if self._link is not None:
            self._goodbye(max(0.1, deadline - time.monotonic()))
            self._link.stop(max(0.1, deadline - time.monotonic()))
        if self.spool is not None:
            self.spool.close()

    def _goodbye(self, timeout: float) -> None:
        link = self._link
        if link is None or not link.connected:
            return
        infos: list[paho.MQTTMessageInfo | None] = []
        if self.json_enabled:
            for cam in sorted(self.cameras.snapshot()):
                av = payloads.encode(payloads.availability_payload(cam, False))
                infos.append(link.publish_now(self.topics.availability(cam), av, self.cfg.qos.state, True))
            st = payloads.encode(payloads.status_payload(False, self.client_id, SOFTWARE, clean=True))
            infos.append(link.publish_now(self.topics.status, st, self.cfg.qos.status, True))
        if self.sparkplug is not None:
            topic, body = self.sparkplug.ndeath_now()
            infos.append(link.publish_now(topic, body, 1, False))
        end = time.monotonic() + timeout
        for info in infos:
            if info is None or info.is_published():
                continue
            try:
                info.wait_for_publish(max(0.01, end - time.monotonic()))
            except (RuntimeError, ValueError) as exc:
                log.warning("mqtt: goodbye message not confirmed: %s", exc)

    # -- introspection ----------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.connected

    def counters(self) -> MqttCounters:
        d = self._delivery.counters if self._delivery is not None else None
        lk = self._link.counters if self._link is not None else None
        sc = self.spool.counters if self.spool is not None else None
        cc = self._dispatcher.counters if self._dispatcher is not None else None
        lat = list(d.latencies_s) if d is not None else []
        return MqttCounters(
            connected=self.connected,
            connects=lk.connects if lk else 0, disconnects=lk.disconnects if lk else 0,
            connect_failures=lk.connect_failures if lk else 0, refused=lk.refused if lk else 0,
            callback_errors=lk.callback_errors if lk else 0,
            enqueued=d.enqueued if d else 0, published=d.published if d else 0, acked=d.acked if d else 0,
            spooled=d.spooled if d else 0, replayed=d.replayed if d else 0,
            spool_messages=sc.messages if sc else 0, spool_bytes=sc.bytes if sc else 0,
            spool_dropped=sum(sc.dropped.values()) if sc else 0, spool_commits=d.committed_batches if d else 0,
            dropped_overflow=d.dropped_overflow if d else 0, send_errors=d.publish_errors if d else 0,
            rejected_by_broker=d.rejected_by_broker if d else 0, encode_errors=self._encode_errors,
            commands_ok=cc.succeeded if cc else 0, commands_failed=cc.failed if cc else 0,
            commands_rejected=cc.rejected if cc else 0,
            ack_latency_p50_ms=percentile(lat, 50) * 1000.0 if lat else None,
            ack_latency_p99_ms=percentile(lat, 99) * 1000.0 if lat else None,
        )


def build_mqtt_publisher(
    cfg: Config, handler: CommandHandler | None = None, validate_delta: DeltaValidator | None = None
) -> MqttPublisher:
    """The runtime's entry point: an MqttPublisher for ``cfg.outputs.mqtt``, started."""
    mqtt_cfg = cfg.outputs.mqtt
    if mqtt_cfg is None:
        raise ValueError("outputs.mqtt is not configured")
    pub = MqttPublisher(mqtt_cfg, cfg.node, handler, validate_delta)
    pub.start()
    return pub
