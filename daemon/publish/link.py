"""The paho-mqtt 2 client wrapper: connection, TLS, credentials, last will, guarded callbacks.

paho's network thread reconnects with a capped doubling delay (``reconnect_min_s`` .. ``reconnect_max_s``) that
paho resets only when a CONNACK reports success. Each successful connection is a *generation*; the sender
publishes only into the generation it has seen start, and paho's own copies of unacked messages are dropped
at every connection change (the sender keeps them and replays them in order from the spool instead).
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from daemon.config.mqtt import MqttConfig
from daemon.publish.outbound import OutMessage

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
Will = tuple[str, bytes, int, bool]
_PROTOBUF = "application/vnd.google.protobuf"


class Secret:
    """A credential that never shows in logs, reprs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str | None = None
    password: Secret | None = None


def load_credentials(cfg: MqttConfig, environ: Mapping[str, str]) -> Credentials:
    """User name and password from the config, a file or the environment; errors name the source, not the value."""
    user = cfg.username
    if cfg.username_env is not None:
        user = environ.get(cfg.username_env)
        if not user:
            raise ValueError(f"outputs.mqtt.username_env: environment variable {cfg.username_env} is not set")
    password: str | None = None
    if cfg.password_env is not None:
        password = environ.get(cfg.password_env)
        if password is None:
            raise ValueError(f"outputs.mqtt.password_env: environment variable {cfg.password_env} is not set")
    elif cfg.password_file is not None:
        path = Path(cfg.password_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"outputs.mqtt.password_file: cannot read {path}: {exc.strerror}") from None
        password = text.splitlines()[0] if text else ""
    return Credentials(user, None if password is None else Secret(password))


@dataclass(slots=True)
class LinkCounters:
    connects: int = 0
    connect_failures: int = 0
    refused: int = 0
    disconnects: int = 0
    callback_errors: int = 0
    last_refusal: str = ""
    messages_in: int = 0


@dataclass(slots=True)
class LinkEvents:
    """Where the link reports (all called on paho's network thread)."""

    up: Callable[[int], None]
    down: Callable[[int], None]
    acked: Callable[[int, int, bool], None]
    message: Callable[[paho.MQTTMessage], None]
    subscriptions: Callable[[], list[tuple[str, int]]]
    next_will: Callable[[], Will | None] = field(default=lambda: None)


class PahoLink:
    """One paho client for the life of the publisher."""

    def __init__(self, cfg: MqttConfig, client_id: str, creds: Credentials, events: LinkEvents,
                 clean_session: bool) -> None:
        self._cfg = cfg
        self._client_id = client_id
        self._creds = creds
        self._events = events
        self._clean = clean_session
        self._v5 = cfg.protocol == "5"
        self._lock = threading.Lock()
        self._up = False
        self._gen = 0
        self._client: paho.Client | None = None
        self._props: dict[bool, Properties | None] = {}
        self.counters = LinkCounters()

    # -- start / stop -----------------------------------------------------------------------------------------
    def start(self) -> None:
        cfg = self._cfg
        proto = MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                             clean_session=None if self._v5 else self._clean, protocol=proto)
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(cast(int, cfg.reconnect_min_s), cast(int, cfg.reconnect_max_s))
        configure_auth(client, cfg, self._creds)
        self._set_will(client)
        client.on_connect = self._guard(self._on_connect)
        client.on_disconnect = self._guard(self._on_disconnect)
        client.on_publish = self._guard(self._on_publish)
        client.on_message = self._guard(self._on_message)
        client.on_connect_fail = self._guard(self._on_connect_fail)
        client.on_subscribe = self._guard(self._on_subscribe)
        client.on_log = self._guard(self._on_log)
        self._props = {True: self._publish_props(True), False: self._publish_props(False)}
        self._client = client
        connect_props = None
        if self._v5 and not self._clean:
            connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            connect_props.SessionExpiryInterval = cfg.session_expiry_s
        kwargs: dict[str, Any] = {"properties": connect_props}
        if self._v5:
            kwargs["clean_start"] = self._clean
        client.connect_async(cfg.host, cfg.effective_port, cfg.keepalive_s, **kwargs)
        client.loop_start()
        log.info("mqtt: connecting to %s:%d as %s (MQTT %s, tls %s)", cfg.host, cfg.effective_port,
                 self._client_id, cfg.protocol, "on" if cfg.tls is not None else "off")

    def _publish_props(self, json_payload: bool) -> Properties | None:
        if not self._v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if json_payload:
            props.PayloadFormatIndicator = 1
            props.ContentType = "application/json"
        else:
            props.ContentType = _PROTOBUF
        return props

    def _set_will(self, client: paho.Client) -> None:
        will = self._events.next_will()
        if will is not None:
            topic, payload, qos, retain = will
            client.will_set(topic, payload, qos, retain)

    def stop(self, timeout: float) -> None:
        client = self._client
        if client is None:
            return
        with self._lock:
            self._up = False
        try:
            client.disconnect()
        except Exception:
            log.exception("mqtt: disconnect failed")
        client.loop_stop()
        self._client = None

    # -- publishing -------------------------------------------------------------------------------------------
    def try_publish(self, generation: int, msg: OutMessage) -> int | None:
        with self._lock:
            client = self._client
            if not self._up or self._gen != generation or client is None:
                return None
            json_payload = not msg.topic.startswith("spBv1.0/")
            info = client.publish(msg.topic, msg.payload, msg.qos, msg.retain, self._props.get(json_payload))
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.warning("mqtt: publish on %s refused by the client: %s", msg.topic, paho.error_string(info.rc))
            return None
        return info.mid if msg.qos > 0 else 0

    def publish_now(self, topic: str, payload: bytes, qos: int, retain: bool,
                    correlation: bytes | None = None) -> paho.MQTTMessageInfo | None:
        """Outside the ordered stream (goodbyes, MQTT 5 responses); None when not connected."""
        with self._lock:
            client = self._client
            if not self._up or client is None:
                return None
            props = self._props.get(not topic.startswith("spBv1.0/"))
            if correlation is not None and self._v5:
                props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                props.PayloadFormatIndicator = 1
                props.ContentType = "application/json"
                props.CorrelationData = correlation
            return client.publish(topic, payload, qos, retain, props)

    @property
    def connected(self) -> bool:
        return self._up

    @property
    def v5(self) -> bool:
        return self._v5

    # -- paho callbacks (network thread; every one guarded) ---------------------------------------------------
    def _guard(self, fn: F) -> F:
        def wrapped(*args: Any) -> None:
            try:
                fn(*args)
            except Exception:
                self.counters.callback_errors += 1
                log.exception("mqtt: %s callback failed (%d callback errors so far)",
                              getattr(fn, "__name__", "?"), self.counters.callback_errors)
        return cast(F, wrapped)

    def _on_connect(self, client: paho.Client, _u: object, flags: Any, reason: Any, _p: object) -> None:
        if reason.is_failure:
            self.counters.refused += 1
            self.counters.last_refusal = str(reason)
            log.error("mqtt: broker %s:%d refused the connection: %s", self._cfg.host, self._cfg.effective_port,
                      reason)
            return
        subs = self._events.subscriptions()
        with self._lock:
            client.drop_out_messages()
            self._gen += 1
            self._up = True
            gen = self._gen
        self.counters.connects += 1
        log.info("mqtt: connected to %s:%d (session present: %s)", self._cfg.host, self._cfg.effective_port,
                 bool(getattr(flags, "session_present", False)))
        for topic, qos in subs:
            client.subscribe(topic, qos)
        self._events.up(gen)

    def _on_disconnect(self, client: paho.Client, _u: object, _flags: object, reason: Any, _p: object) -> None:
        with self._lock:
            was_up = self._up
            self._up = False
            client.drop_out_messages()
            gen = self._gen
        if was_up:
            self.counters.disconnects += 1
            log.warning("mqtt: connection to %s:%d lost: %s", self._cfg.host, self._cfg.effective_port, reason)
            self._set_will(client)
            self._events.down(gen)

    def _on_connect_fail(self, _client: paho.Client, _u: object) -> None:
        self.counters.connect_failures += 1
        n = self.counters.connect_failures
        if n & (n - 1) == 0:
            log.warning("mqtt: cannot reach %s:%d (%d attempts so far); retrying with backoff",
                        self._cfg.host, self._cfg.effective_port, n)

    def _on_publish(self, _client: paho.Client, _u: object, mid: int, reason: Any, _p: object) -> None:
        # paho calls this holding its message lock while the sender holds ours around publish(): taking ours
        # here would invert the lock order. _gen is only written on this (the network) thread.
        self._events.acked(self._gen, mid, not reason.is_failure)

    def _on_subscribe(self, _client: paho.Client, _u: object, mid: int, reasons: Any, _p: object) -> None:
        for rc in reasons:
            if rc.is_failure:
                log.error("mqtt: subscription %d refused by the broker: %s", mid, rc)

    def _on_log(self, _client: paho.Client, _u: object, level: int, buf: str) -> None:
        # paho's own errors repeat what on_disconnect/on_connect_fail already report (counted, with backoff)
        log.debug("paho[%d]: %s", level, buf)

    def _on_message(self, _client: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        self.counters.messages_in += 1
        self._events.message(message)


def configure_auth(client: paho.Client, cfg: MqttConfig, creds: Credentials) -> None:
    """Credentials and TLS on a paho client (the publisher and `deltayolo mqtt-tail` share this)."""
    if creds.username is not None:
        pw = creds.password.reveal() if creds.password is not None else None
        client.username_pw_set(creds.username, pw)
    if cfg.tls is not None:
        t = cfg.tls
        client.tls_set(ca_certs=_str(t.ca_file), certfile=_str(t.cert_file), keyfile=_str(t.key_file),
                       cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if t.insecure:
            log.warning("mqtt: tls.insecure is set: the broker's host name is not checked")
            client.tls_insecure_set(True)


def _str(p: Path | None) -> str | None:
    return None if p is None else str(Path(p).expanduser())
