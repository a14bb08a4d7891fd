"""The `outputs.mqtt` config section: broker, credentials, TLS, QoS, spool, commands, Sparkplug B."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from daemon.config.base import StrictModel

Qos = Annotated[int, Field(ge=0, le=2, description="MQTT QoS level 0, 1 or 2")]
EnvName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
SparkplugId = Annotated[
    str,
    Field(min_length=1, max_length=128, pattern=r"^[^/+#\s]+$",
          description="A Sparkplug B topic element: no '/', '+', '#' or spaces"),
]


class MqttTls(StrictModel):
    """TLS to the broker. Present means on; without ca_file the system's CA store is used."""

    ca_file: Path | None = Field(default=None, description="PEM file of the CA(s) that signed the broker's certificate")
    cert_file: Path | None = Field(default=None, description="PEM client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="PEM private key of the client certificate")
    insecure: bool = Field(
        default=False,
        description="Skip the broker host name check (the chain is still verified). Never in production",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> MqttTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both or neither")
        return self


class MqttQos(StrictModel):
    """QoS per kind of message."""

    detections: Qos = Field(default=1, description="QoS of per-frame detection messages")
    errors: Qos = Field(default=1, description="QoS of per-frame error messages")
    state: Qos = Field(default=1, description="QoS of camera state and availability messages")
    stats: Qos = Field(default=1, description="QoS of node stats messages")
    status: Qos = Field(default=1, description="QoS of the retained node status (birth and last will)")
    acks: Qos = Field(default=1, description="QoS of command acknowledgements")
    commands: Qos = Field(default=1, description="QoS of the command subscription")


class MqttSpool(StrictModel):
    """Store-and-forward: what the broker cannot take yet waits in SQLite (WAL) and is replayed in order."""

    path: Path | None = Field(
        default=None,
        description="SQLite file; default $STATE_DIRECTORY (systemd) or ~/.local/state/deltayolo, "
        "file mqtt-spool-{node}.sqlite",
    )
    max_messages: int = Field(default=1_000_000, ge=100, le=1_000_000_000, description="Most messages kept")
    max_bytes: int = Field(
        default=1 << 30, ge=1 << 16, le=1 << 40, description="Most payload bytes kept (topics not counted)"
    )
    on_full: Literal["drop_oldest", "drop_newest"] = Field(
        default="drop_oldest",
        description="When full: drop the oldest detections (then frame errors, then stats) to make room, or "
        "refuse new ones of those kinds. State messages are never dropped. Every drop is counted",
    )
    fsync: bool = Field(
        default=False,
        description="SQLite synchronous=FULL: fsync every spool transaction, so committed messages also survive "
        "power loss and kernel crashes; false (synchronous=NORMAL, WAL) survives a killed process, not power loss",
    )


class MqttCommands(StrictModel):
    """Runtime commands under {root}/cmd/..., acknowledged on {root}/ack."""

    enabled: bool = Field(default=True, description="Subscribe to and act on commands")
    max_payload_bytes: int = Field(
        default=65536, ge=64, le=1 << 20, description="Larger command payloads are rejected unread"
    )
    max_depth: int = Field(default=8, ge=1, le=64, description="Deepest JSON nesting accepted in a command")
    queue_size: int = Field(
        default=64, ge=1, le=10000, description="Commands waiting for the handler; more are refused"
    )


class MqttSparkplug(StrictModel):
    """Sparkplug B naming (used when format is sparkplug or both)."""

    group_id: SparkplugId | None = Field(
        default=None, description="Sparkplug group id; default '{site}:{area}:{line}'"
    )
    edge_node_id: SparkplugId | None = Field(default=None, description="Sparkplug edge node id; default node.node")
    data_qos: Qos = Field(
        default=0,
        description="QoS of NBIRTH/DBIRTH/NDATA/DDATA. The Sparkplug spec says 0; 1 lets the spool guarantee "
        "delivery of DDATA across outages",
    )


class MqttConfig(StrictModel):
    """MQTT output for MES systems: JSON topic tree and/or Sparkplug B, with store-and-forward."""

    host: str = Field(default="localhost", min_length=1, max_length=253, description="Broker host name or address")
    port: int | None = Field(default=None, ge=1, le=65535, description="Broker port; default 8883 with TLS, else 1883")
    protocol: Literal["3.1.1", "5"] = Field(default="3.1.1", description="MQTT protocol version")
    client_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_:.-]+$",
        description="MQTT client id; default deltayolo-{site}-{area}-{line}-{node} (stable, for persistent sessions)",
    )
    username: str | None = Field(default=None, min_length=1, max_length=256, description="Broker user name")
    username_env: EnvName | None = Field(default=None, description="Environment variable holding the user name")
    password_file: Path | None = Field(default=None, description="File holding the password (first line)")
    password_env: EnvName | None = Field(default=None, description="Environment variable holding the password")
    tls: MqttTls | None = Field(default=None, description="TLS settings; absent means plain TCP")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive interval")
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60, description="First reconnect delay")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600, description="Reconnect delay cap (doubling)")
    clean_session: bool = Field(
        default=False,
        description="Start a clean session; false keeps the broker session (queued commands survive outages). "
        "Sparkplug modes always use a clean session, as the spec requires",
    )
    session_expiry_s: int = Field(
        default=3600, ge=0, le=4_294_967_295, description="MQTT 5 session expiry when clean_session is false"
    )
    max_inflight: int = Field(default=100, ge=1, le=65535, description="QoS>0 messages awaiting the broker's ack")
    max_pending: int = Field(
        default=20000, ge=100, le=10_000_000, description="Messages buffered in memory before the spool writer"
    )
    enqueue_timeout_s: float = Field(
        default=0.2, ge=0, le=10,
        description="Longest a publish call waits for room in memory before dropping the oldest detection",
    )
    durable: bool = Field(
        default=True,
        description="Write-ahead delivery: every message is committed to the spool (one transaction per batch) "
        "before it is sent and leaves it only when the broker acked it, so a daemon killed hard (SIGKILL, OOM) "
        "loses nothing committed; the next start replays it first (QoS 1: duplicates possible). False: the spool "
        "is written only while the broker is away or at a clean stop",
    )
    format: Literal["json", "sparkplug", "both"] = Field(
        default="json",
        description="json: the deltayolo topic tree; sparkplug: Sparkplug B only; both: both (the last will is "
        "then the Sparkplug NDEATH; the JSON status goes offline only on a clean stop)",
    )
    qos: MqttQos = Field(default_factory=MqttQos, description="QoS per kind of message")
    include_empty: bool = Field(default=True, description="Publish detection messages for frames with no boxes")
    publish_stats: bool = Field(default=True, description="Publish node stats")
    spool: MqttSpool = Field(default_factory=MqttSpool, description="Store-and-forward spool")
    commands: MqttCommands = Field(default_factory=MqttCommands, description="Runtime commands over MQTT")
    sparkplug: MqttSparkplug = Field(default_factory=MqttSparkplug, description="Sparkplug B naming and QoS")

    @model_validator(mode="after")
    def _check(self) -> MqttConfig:
        if self.username is not None and self.username_env is not None:
            raise ValueError("set username or username_env, not both")
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        has_user = self.username is not None or self.username_env is not None
        if (self.password_file is not None or self.password_env is not None) and not has_user:
            raise ValueError("a password needs a user name (username or username_env)")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be >= reconnect_min_s ({self.reconnect_min_s})"
            )
        return self

    @property
    def effective_port(self) -> int:
        if self.port is not None:
            return self.port
        return 8883 if self.tls is not None else 1883
