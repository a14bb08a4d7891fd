"""sd_notify client, watchdog pinger and signal handlers against a real NOTIFY_SOCKET (unix datagrams)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.lifecycle.sdnotify import (
    SdNotifier,
    monotonic_usec,
    parse_notify_socket,
    parse_watchdog_usec,
)
from daemon.lifecycle.signals import SignalHandlers
from daemon.lifecycle.watchdog import WatchdogPinger, interval_from_usec, pinger_for

REPO = Path(__file__).resolve().parents[1]


class Receiver:
    """The systemd side: a bound datagram socket that collects messages."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address  # what goes into NOTIFY_SOCKET

    def recv(self, timeout: float = 2.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def drain(self) -> list[str]:
        out = []
        self.sock.settimeout(0.0)
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return out

    def collect(self, seconds: float) -> list[str]:
        out, deadline = [], time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.recv(left))
            except TimeoutError:
                break
        return out


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    # AF_UNIX paths are limited to 107 bytes: pytest's tmp_path can be longer, so use a short directory.
    with tempfile.TemporaryDirectory(prefix="dy-") as d:
        path = os.path.join(d, "notify.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        try:
            yield Receiver(sock, path)
        finally:
            sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"deltayolo-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield Receiver(sock, "@" + name)
    finally:
        sock.close()


def test_exact_messages_on_a_path_socket(receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address})
    assert n.enabled
    assert n.ready()
    assert receiver.recv() == "READY=1"
    assert n.ready("warm, 3 cameras")
    assert receiver.recv() == "READY=1\nSTATUS=warm, 3 cameras"
    assert n.status("running: 3 cameras, 29.8 fps")
    assert receiver.recv() == "STATUS=running: 3 cameras, 29.8 fps"
    assert n.watchdog()
    assert receiver.recv() == "WATCHDOG=1"
    assert n.stopping("draining")
    assert receiver.recv() == "STOPPING=1\nSTATUS=draining"
    assert n.stopping()
    assert receiver.recv() == "STOPPING=1"
    assert n.extend_timeout(2.5)
    assert receiver.recv() == "EXTEND_TIMEOUT_USEC=2500000"
    n.close()


def test_reloading_carries_monotonic_usec(receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address})
    before = monotonic_usec()
    assert n.reloading("reloading config")
    after = monotonic_usec()
    lines = receiver.recv().split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    assert before <= int(lines[1].split("=", 1)[1]) <= after
    assert lines[2] == "STATUS=reloading config"
    fixed = SdNotifier(receiver.address, clock_usec=lambda: 123456789)
    assert fixed.reloading()
    assert receiver.recv() == "RELOADING=1\nMONOTONIC_USEC=123456789"


def test_abstract_socket(abstract_receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": abstract_receiver.address})
    assert n.ready("up")
    assert abstract_receiver.recv() == "READY=1\nSTATUS=up"


def test_unset_is_a_no_op() -> None:
    n = SdNotifier.from_env({})
    assert not n.enabled
    assert n.watchdog_usec is None
    assert not n.ready()
    assert not n.watchdog()
    assert not n.stopping()


def test_status_is_one_line_and_fields_are_checked(receiver: Receiver) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address})
    assert n.status("camera cam1 failed:\nconnection refused")
    assert receiver.recv() == "STATUS=camera cam1 failed: connection refused"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        n.notify("READY")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        n.notify("STATUS=a\nREADY=1")
    with pytest.raises(ValueError, match="seconds must be > 0"):
        n.extend_timeout(0)


def test_gone_receiver_never_raises(tmp_path: Path) -> None:
    n = SdNotifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    assert n.enabled
    assert not n.ready()
    assert not n.watchdog()


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("", None), ("/run/systemd/notify", "/run/systemd/notify"), ("@sd-x", "\0sd-x"),
    ("@", None), ("relative/path", None), ("vsock:2:1234", None),
])
def test_parse_notify_socket(value: str | None, expected: str | None) -> None:
    assert parse_notify_socket(value) == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 30_000_000),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # armed for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
])
def test_parse_watchdog_usec(env: dict[str, str], expected: int | None) -> None:
    assert parse_watchdog_usec(env, pid=4242) == expected


def test_pinger_only_when_watchdog_armed(receiver: Receiver) -> None:
    plain = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address})
    assert pinger_for(plain, lambda: 0.0) is None
    armed = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "30000000"})
    pinger = pinger_for(armed, lambda: 0.0)
    assert pinger is not None
    assert pinger.interval_s == 15.0
    assert interval_from_usec(200_000) == 0.1
    no_socket = SdNotifier.from_env({"WATCHDOG_USEC": "30000000"})
    assert pinger_for(no_socket, lambda: 0.0) is None


def test_watchdog_pings_stop_when_heartbeat_goes_stale(receiver: Receiver) -> None:
    """Heartbeat fresh -> WATCHDOG=1 every interval; stale -> no more pings (systemd would restart us)."""
    age = [0.0]
    n = SdNotifier.from_env({"NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "100000"})
    usec = n.watchdog_usec
    assert usec == 100_000
    pinger = WatchdogPinger(n, lambda: age[0], max_age_s=1.0, interval_s=interval_from_usec(usec))
    pinger.start()
    try:
        fresh = receiver.collect(0.5)
        assert fresh.count("WATCHDOG=1") >= 4, fresh  # 0.05 s interval: ~10 expected
        assert set(fresh) == {"WATCHDOG=1"}
        age[0] = 5.0  # the pipeline froze
        # A ping whose turn read the age just before the freeze may still arrive before the STATUS line.
        stalled = "STATUS=pipeline stalled: heartbeat 5.0 s old (limit 1.0 s)"
        assert _until(receiver, stalled) <= {"WATCHDOG=1"}
        stale = receiver.collect(0.5)
        assert stale == [], stale
        age[0] = 0.2  # recovered before systemd acted
        assert _until(receiver, "STATUS=pipeline recovered; watchdog pings resumed") == set()
        back = receiver.collect(0.5)
        assert back.count("WATCHDOG=1") >= 4
    finally:
        assert pinger.stop(2.0)
    receiver.drain()
    assert receiver.collect(0.2) == []  # stopped means silent


def _until(receiver: Receiver, wanted: str, timeout: float = 5.0) -> set[str]:
    """Receive until ``wanted`` arrives; returns the other messages seen before it."""
    others: set[str] = set()
    deadline = time.monotonic() + timeout
    while (msg := receiver.recv(max(0.01, deadline - time.monotonic()))) != wanted:
        others.add(msg)
    return others


def test_watchdog_withholds_ping_when_probe_raises(receiver: Receiver) -> None:
    def broken() -> float:
        raise RuntimeError("heartbeat board gone")

    n = SdNotifier(receiver.address, watchdog_usec=100_000)
    pinger = WatchdogPinger(n, broken, max_age_s=1.0, interval_s=0.05)
    assert not pinger.check_once()
    assert receiver.drain() == ["STATUS=pipeline stalled: heartbeat inf s old (limit 1.0 s)"]
    with pytest.raises(ValueError, match="max_age_s"):
        WatchdogPinger(n, broken, max_age_s=0, interval_s=1)


def _wait(pred: object, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return True
        time.sleep(0.01)
    return False


def test_signal_handlers_set_stop_and_call_reload_then_restore() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    stop = threading.Event()
    reloads: list[int] = []
    with SignalHandlers(stop, on_reload=lambda: reloads.append(1)) as handlers:
        os.kill(os.getpid(), signal.SIGHUP)
        assert _wait(lambda: reloads == [1])
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait(stop.is_set)
        os.kill(os.getpid(), signal.SIGHUP)  # ignored while stopping
        os.kill(os.getpid(), signal.SIGINT)  # a second stop signal only logs
        assert _wait(lambda: handlers.stop_signals == ["SIGTERM", "SIGINT"])
        assert reloads == [1]
        assert handlers.reloads == 1
    assert {s: signal.getsignal(s) for s in before} == before


def test_signal_handlers_refuse_other_threads() -> None:
    errors: list[BaseException] = []

    def attempt() -> None:
        try:
            SignalHandlers(threading.Event()).install()
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=attempt, name="not-main")
    t.start()
    t.join()
    assert len(errors) == 1
    assert "main thread" in str(errors[0])
    assert "not-main" in str(errors[0])


def test_reload_callback_failure_is_contained() -> None:
    def bad() -> None:
        raise RuntimeError("config broken")

    stop = threading.Event()
    with SignalHandlers(stop, on_reload=bad) as handlers:
        os.kill(os.getpid(), signal.SIGHUP)
        assert _wait(lambda: handlers.reloads == 1)
    assert not stop.is_set()


_CHILD = textwrap.dedent("""
    import threading, time
    from daemon.lifecycle.sdnotify import SdNotifier
    from daemon.lifecycle.signals import SignalHandlers
    from daemon.lifecycle.watchdog import pinger_for

    stop = threading.Event()
    notifier = SdNotifier.from_env()
    with SignalHandlers(stop, on_reload=lambda: notifier.reloading()):
        pinger = pinger_for(notifier, lambda: 0.0)
        pinger.start()
        notifier.ready("running: 1 camera")
        while not stop.wait(0.05):
            pass
        notifier.stopping("draining")
        pinger.stop()
    notifier.status("stopped")
""")


def test_a_process_lifecycle_under_notify_socket(receiver: Receiver) -> None:
    """READY, periodic WATCHDOG, STOPPING on SIGTERM, clean exit: the pieces wired as the daemon does."""
    env = {**os.environ, "NOTIFY_SOCKET": receiver.address, "WATCHDOG_USEC": "200000",
           "PYTHONPATH": str(REPO)}
    env.pop("WATCHDOG_PID", None)
    child = subprocess.Popen([sys.executable, "-c", _CHILD], env=env)
    try:
        got = []
        deadline = time.monotonic() + 10
        while "READY=1\nSTATUS=running: 1 camera" not in got and time.monotonic() < deadline:
            got.append(receiver.recv(10))
        assert "READY=1\nSTATUS=running: 1 camera" in got
        pings = receiver.collect(0.5)
        assert pings.count("WATCHDOG=1") >= 3, pings
        child.send_signal(signal.SIGTERM)
        assert child.wait(5) == 0
    finally:
        if child.poll() is None:
            child.kill()
    rest = [m for m in receiver.drain() if m != "WATCHDOG=1"]
    assert rest == ["STOPPING=1\nSTATUS=draining", "STATUS=stopped"]
