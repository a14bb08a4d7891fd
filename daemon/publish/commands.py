"""Runtime commands under ``{root}/cmd/...``: strict parsing into frozen dataclasses, dispatch, acknowledgement.

Topics and payloads (JSON objects; an empty payload means ``{}``; every command accepts an optional ``"id"``
string of up to 64 characters that the acknowledgement echoes):

- ``cmd/{camera}/set_thresholds``  ``{"confidence": 0.4, "iou": 0.6}`` (either or both, each in (0, 1])
- ``cmd/{camera}/set_delta``       delta settings, validated by the runtime (today: ``{"enabled": false}``)
- ``cmd/{camera}/enable``, ``cmd/{camera}/disable``, ``cmd/{camera}/keyframe``   ``{}``
- ``cmd/rebirth``                  ``{}``: republish every birth message

Every command gets one acknowledgement on ``{root}/ack`` (and on the MQTT 5 response topic, with the
correlation data, when the request carried one): ``ok`` and a message saying what was done or why not.
Payloads over the size limit, invalid UTF-8/JSON, nesting deeper than the limit, unknown topics or keys and
values of the wrong type or range are rejected with a reason; nothing a client sends can crash the daemon.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

from daemon.publish.topics import Topics

log = logging.getLogger(__name__)
_ID = re.compile(r"^[\x20-\x7e]{1,64}$")


@dataclass(frozen=True, slots=True)
class SetThresholds:
    camera: str
    confidence: float | None
    iou: float | None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class SetDelta:
    camera: str
    settings: Mapping[str, object]  # read-only, as returned by the delta validator
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class SetCameraEnabled:
    camera: str
    enabled: bool
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class RequestKeyframe:
    camera: str
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Rebirth:
    request_id: str | None = None


Command = SetThresholds | SetDelta | SetCameraEnabled | RequestKeyframe | Rebirth


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    ok: bool
    message: str


class CommandHandler(Protocol):
    """Supplied by the runtime: applies a command (quickly) and says how it went."""

    def handle(self, cmd: Command) -> CommandOutcome: ...


DeltaValidator = Callable[[Mapping[str, object]], Mapping[str, object]]


class CommandRejected(ValueError):
    """A command that is not acted on; the message is the reason sent back in the acknowledgement."""


@dataclass(frozen=True, slots=True)
class CommandLimits:
    max_payload_bytes: int = 65536
    max_depth: int = 8


@dataclass(frozen=True, slots=True)
class CommandAck:
    command: str
    camera: str | None
    request_id: str | None
    ok: bool
    message: str
    response_topic: str | None = None
    correlation: bytes | None = None


def default_delta_validator(settings: Mapping[str, object]) -> Mapping[str, object]:
    """Until delta caching lands, the only delta setting is ``enabled`` (a boolean)."""
    unknown = sorted(set(settings) - {"enabled"})
    if unknown:
        raise ValueError(f"unknown delta settings {unknown}; known: ['enabled']")
    if "enabled" not in settings:
        raise ValueError("set_delta needs at least one setting, e.g. {\"enabled\": false}")
    if not isinstance(settings["enabled"], bool):
        raise ValueError(f"enabled must be true or false, got {_show(settings['enabled'])}")
    return {"enabled": settings["enabled"]}


def _show(value: object) -> str:
    text = json.dumps(value) if isinstance(value, str | int | float | bool) or value is None else type(value).__name__
    return f"{text[:60]} ({type(value).__name__})"


def json_depth(text: str) -> int:
    """Deepest array/object nesting of a JSON text (strings skipped), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _reject_constant(name: str) -> Any:
    raise CommandRejected(f"{name} is not a valid JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise CommandRejected(f"key {k[:60]!r} appears twice")
        out[k] = v
    return out


def decode_payload(payload: bytes, limits: CommandLimits) -> dict[str, Any]:
    """Bytes -> a JSON object, or CommandRejected saying why not."""
    if len(payload) > limits.max_payload_bytes:
        raise CommandRejected(f"payload of {len(payload)} bytes exceeds the limit of {limits.max_payload_bytes}")
    if not payload.strip():
        return {}
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandRejected(f"payload is not UTF-8 text (byte {exc.start})") from None
    depth = json_depth(text)
    if depth > limits.max_depth:
        raise CommandRejected(f"JSON nesting depth {depth} exceeds the limit of {limits.max_depth}")
    try:
        data = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except CommandRejected:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, or a number too long to convert
        raise CommandRejected(f"payload is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise CommandRejected(f"payload must be a JSON object, got {type(data).__name__}")
    return data


def _request_id(data: dict[str, Any]) -> str | None:
    rid = data.pop("id", None)
    if rid is None:
        return None
    if not isinstance(rid, str) or not _ID.match(rid):
        raise CommandRejected(f"id must be a string of 1-64 printable ASCII characters, got {_show(rid)}")
    return rid


def _no_keys(verb: str, data: Mapping[str, Any]) -> None:
    if data:
        raise CommandRejected(f"{verb} takes no parameters besides id, got {sorted(data)[:10]}")


def _unit_interval(verb: str, camera: str, key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CommandRejected(f"{verb} for camera {camera!r}: {key} must be a number, got {_show(value)}")
    if not 0.0 < float(value) <= 1.0:
        raise CommandRejected(f"{verb} for camera {camera!r}: {key} must be in (0, 1], got {value}")
    return float(value)


def parse_command(
    topics: Topics, topic: str, payload: bytes, limits: CommandLimits, validate_delta: DeltaValidator
) -> Command:
    """A ``{root}/cmd/...`` message -> a Command, or CommandRejected with the reason."""
    try:
        ct = topics.parse_command(topic)
    except ValueError as exc:
        raise CommandRejected(str(exc)) from None
    data = decode_payload(payload, limits)
    rid = _request_id(data)
    verb, camera = ct.verb, ct.camera
    if camera is None:
        _no_keys(verb, data)
        return Rebirth(rid)
    if verb == "set_thresholds":
        unknown = sorted(set(data) - {"confidence", "iou"})
        if unknown:
            raise CommandRejected(f"set_thresholds for camera {camera!r}: unknown keys {unknown[:10]}; "
                                  "known: ['confidence', 'iou', 'id']")
        if not data:
            raise CommandRejected(f"set_thresholds for camera {camera!r} needs confidence and/or iou")
        conf = _unit_interval(verb, camera, "confidence", data["confidence"]) if "confidence" in data else None
        iou = _unit_interval(verb, camera, "iou", data["iou"]) if "iou" in data else None
        return SetThresholds(camera, conf, iou, rid)
    if verb == "set_delta":
        try:
            settings = validate_delta(dict(data))
        except (ValueError, TypeError) as exc:
            raise CommandRejected(f"set_delta for camera {camera!r}: {exc}") from None
        return SetDelta(camera, MappingProxyType(dict(settings)), rid)
    _no_keys(verb, data)
    if verb in ("enable", "disable"):
        return SetCameraEnabled(camera, verb == "enable", rid)
    return RequestKeyframe(camera, rid)


def describe(cmd: Command) -> tuple[str, str | None]:
    """(command name, camera) for acknowledgements and logs."""
    if isinstance(cmd, Rebirth):
        return "rebirth", None
    if isinstance(cmd, SetThresholds):
        return "set_thresholds", cmd.camera
    if isinstance(cmd, SetDelta):
        return "set_delta", cmd.camera
    if isinstance(cmd, SetCameraEnabled):
        return ("enable" if cmd.enabled else "disable"), cmd.camera
    return "keyframe", cmd.camera


@dataclass(slots=True)
class CommandCounters:
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    rejected: int = 0
    handler_errors: int = 0


@dataclass(frozen=True, slots=True)
class _Job:
    topic: str
    payload: bytes
    response_topic: str | None
    correlation: bytes | None


class CommandDispatcher:
    """Takes raw command messages from the network thread, parses and runs them on its own thread, acks each."""

    def __init__(
        self,
        topics: Topics,
        handler: CommandHandler | None,
        limits: CommandLimits,
        queue_size: int,
        reply: Callable[[CommandAck], None],
        rebirth: Callable[[], None],
        validate_delta: DeltaValidator = default_delta_validator,
    ) -> None:
        self._topics = topics
        self._handler = handler
        self._limits = limits
        self._reply = reply
        self._rebirth = rebirth
        self._validate_delta = validate_delta
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self.counters = CommandCounters()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mqtt-cmd", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> None:
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=max(0.01, timeout))
        except queue.Full:
            log.warning("command queue still full at stop; %d commands not run", self._queue.qsize())
        self._thread.join(timeout)

    def submit(self, topic: str, payload: bytes, response_topic: str | None, correlation: bytes | None) -> None:
        """Never blocks, never raises: a full queue refuses the command with an acknowledgement."""
        self.counters.received += 1
        try:
            self._queue.put_nowait(_Job(topic, payload, response_topic, correlation))
        except queue.Full:
            self._ack(_Job(topic, b"", response_topic, correlation), "unknown", None, None, False,
                      f"busy: {self._queue.maxsize} commands already waiting")
            self.counters.rejected += 1

    def run_one(self, topic: str, payload: bytes, response_topic: str | None = None,
                correlation: bytes | None = None) -> CommandAck:
        """Parse, run and acknowledge one command (on the calling thread); returns the acknowledgement."""
        return self._process(_Job(topic, payload, response_topic, correlation))

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._process(job)
            except Exception:
                self.counters.handler_errors += 1
                log.exception("command on %s failed", job.topic[:200])

    def _process(self, job: _Job) -> CommandAck:
        try:
            cmd = parse_command(self._topics, job.topic, job.payload, self._limits, self._validate_delta)
        except CommandRejected as exc:
            self.counters.rejected += 1
            log.warning("command on %s rejected: %s", job.topic[:200], exc)
            return self._ack(job, _verb_of(job.topic), None, None, False, str(exc))
        name, camera = describe(cmd)
        outcome = self._execute(cmd)
        if outcome.ok:
            self.counters.succeeded += 1
            log.info("command %s camera=%s: %s", name, camera, outcome.message)
        else:
            self.counters.failed += 1
            log.warning("command %s camera=%s refused: %s", name, camera, outcome.message)
        return self._ack(job, name, camera, cmd.request_id, outcome.ok, outcome.message)

    def _execute(self, cmd: Command) -> CommandOutcome:
        if isinstance(cmd, Rebirth):
            self._rebirth()
            return CommandOutcome(True, "rebirth: birth messages republished")
        if self._handler is None:
            return CommandOutcome(False, "this node runs no command handler")
        try:
            return self._handler.handle(cmd)
        except Exception as exc:
            self.counters.handler_errors += 1
            log.exception("command handler failed on %s", cmd)
            return CommandOutcome(False, f"handler error: {type(exc).__name__}: {str(exc)[:200]}")

    def _ack(self, job: _Job, command: str, camera: str | None, rid: str | None, ok: bool, msg: str) -> CommandAck:
        ack = CommandAck(command, camera, rid, ok, msg, job.response_topic, job.correlation)
        try:
            self._reply(ack)
        except Exception:
            log.exception("sending the acknowledgement of %s failed", command)
        return ack


def _verb_of(topic: str) -> str:
    last = topic.rsplit("/", 1)[-1]
    return last[:40] if re.match(r"^[a-z_]{1,40}$", last) else "unknown"
