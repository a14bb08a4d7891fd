"""What the sender moves and whom it talks to: the message record, the link and session-hook protocols."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class OutMessage:
    order: int  # global production order; 0 for session messages (births) that are never spooled
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    enqueued: float = 0.0  # time.monotonic() at enqueue; 0 when unknown (loaded from the spool)


class Link(Protocol):
    """What the sender needs from the MQTT client wrapper."""

    def try_publish(self, generation: int, msg: OutMessage) -> int | None:
        """Publish if the link is up in this generation; the message id (0 for QoS 0), or None if not sent."""


class SessionHooks(Protocol):
    """Payload-format specifics (JSON tree, Sparkplug B) the sender consults at send time."""

    def births(self) -> list[OutMessage]:
        """Messages that open every session (and a rebirth), sent before any data."""

    def prepare(self, msg: OutMessage, replay: bool) -> tuple[list[OutMessage], OutMessage | None]:
        """(untracked messages to send first, the message as it goes on the wire or None to skip it)."""


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100.0 * len(s)) - 1))
    return s[k]
