"""A real mosquitto for tests: free 127.0.0.1 port, generated config, optional TLS and password file.

TLS material (a CA, a server certificate for localhost/127.0.0.1, a client certificate) is made with the
`cryptography` package; the password file with `mosquitto_passwd`. The broker is stopped by PID and can be
stopped and started again on the same port with its persistence (sessions, retained messages) kept.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from daemon.types import Detection, FrameResult, StageTimes

MOSQUITTO = "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
          issuer_key: ec.EllipticCurvePrivateKey | None, ca: bool, server: bool) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=2))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if issuer_key is not None:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def make_tls(folder: Path) -> TlsFiles:
    """A CA, a server certificate for localhost and 127.0.0.1, and a client certificate, as PEM files."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("deltayolo test CA", ca_key, None, None, ca=True, server=False)
    files = TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key",
                     folder / "client.pem", folder / "client.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for cert_path, key_path, server in ((files.server_cert, files.server_key, True),
                                        (files.client_cert, files.client_key, False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("localhost" if server else "deltayolo-client", key, ca.subject, ca_key, ca=False,
                     server=server)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_key_pem(key))
        key_path.chmod(0o600)
    return files


class Broker:
    """One mosquitto process on 127.0.0.1:port (port kept across stop/start)."""

    def __init__(self, folder: Path, tls: TlsFiles | None = None, users: dict[str, str] | None = None,
                 require_client_cert: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.host = "127.0.0.1"
        self.tls = tls
        self.users = users
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = folder / "mosquitto.log"
        self.conf_path = folder / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            "persistence true",
            f"persistence_location {folder}/",
            "max_queued_messages 1000000",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            f"log_dest file {self.log_path}",
            "log_type error", "log_type warning", "log_type notice",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if users:
            pw = folder / "passwd"
            for i, (user, password) in enumerate(users.items()):
                args = ["mosquitto_passwd", "-b"] + (["-c"] if i == 0 else []) + [str(pw), user, password]
                subprocess.run(args, check=True, capture_output=True, timeout=10)
            lines.append(f"password_file {pw}")
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.server_cert}", f"keyfile {tls.server_key}",
                      f"require_certificate {'true' if require_client_cert else 'false'}"]
        self.conf_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout: float = 10.0) -> None:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf_path)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                log = self.log_path.read_text() if self.log_path.exists() else ""
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: {err} {log[-2000:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence file), SIGKILL if it does not end in time."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""


# -- helpers shared by the MQTT tests: real paho subscribers and synthetic results -----------------------------
def make_result(camera: str, seq: int, boxes: int = 2, capture_time: float | None = None) -> FrameResult:
    """A FrameResult as the pipeline hands it over (boxes in source pixels of a 1280x960 frame)."""
    now = time.time() if capture_time is None else capture_time
    dets = tuple(
        Detection(i % 80, "person" if i % 2 == 0 else "car", 0.5 + 0.4 * ((seq + i) % 10) / 10,
                  10.0 + i, 20.0 + i, 110.5 + i, 220.25 + i)
        for i in range(boxes)
    )
    return FrameResult(camera, seq, now, time.monotonic(), 1280, 960, dets, 120_000, 1280 * 960 * 3,
                       times=StageTimes(0.001, 0.004, 0.012, 0.002))


class Collector:
    """A real paho subscriber that records every message (topic, payload, retain flag) in arrival order."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "test-collector",
                 persistent: bool = True, v5: bool = False, **tls_args: object) -> None:
        proto = MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  clean_session=None if v5 else not persistent, protocol=proto)
        self.messages: list[tuple[str, bytes, bool]] = []
        self.props: list[object] = []
        self.qos: dict[str, int] = {}
        self._lock = threading.Lock()
        self._topics = topics
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.reconnect_delay_set(1, 1)
        if tls_args:
            self.client.tls_set(**tls_args)  # type: ignore[arg-type]
        self.broker = broker

    def start(self, username: str | None = None, password: str | None = None) -> Collector:
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.connect_async(self.broker.host, self.broker.port, 30)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise RuntimeError("collector did not subscribe")
        return self

    def _on_connect(self, client: paho.Client, *_a: object) -> None:
        for t in self._topics:
            client.subscribe(t, 1)

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))
            self.props.append(getattr(msg, "properties", None))
            self.qos[msg.topic] = msg.qos

    def on(self, suffix: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _r in self.messages if t.endswith(suffix)]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_CHILD = """
import json, sys, time
from types import SimpleNamespace
from daemon.config.mqtt import MqttConfig
from daemon.publish.mqtt import MqttPublisher
pub = MqttPublisher(MqttConfig.model_validate(json.loads(sys.argv[1])), SimpleNamespace(**json.loads(sys.argv[2])))
pub.start()
pub.publish_camera_state("cam1", "streaming", "")
while not pub.connected:
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(60)
"""


def run_child(cfg: dict[str, Any], node: dict[str, str]) -> subprocess.Popen[str]:
    """A publisher in its own process (to be killed -9: no DISCONNECT, the broker sends the last will)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg), json.dumps(node)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc
