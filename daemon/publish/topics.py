"""Every MQTT topic string deltayolo uses is built here, and nowhere else.

JSON tree (ISA-95 path), ``root = {site}/{area}/{line}/deltayolo/{node}``:

- ``{root}/status``                  retained node status: "online" on connect (birth), "offline" as last will
- ``{root}/stats``                   node stats (bandwidth figures included)
- ``{root}/ack``                     command acknowledgements
- ``{root}/{camera}/detections``     one message per processed frame
- ``{root}/{camera}/errors``         frames that could not be processed
- ``{root}/{camera}/state``          retained camera state (and each change as it happens)
- ``{root}/{camera}/availability``   retained "online"/"offline" of the camera
- ``{root}/cmd/rebirth``             command: republish every birth message
- ``{root}/cmd/{camera}/{verb}``     commands: set_thresholds, set_delta, enable, disable, keyframe

Sparkplug B: ``spBv1.0/{group_id}/{NBIRTH|NDEATH|NDATA|NCMD}/{edge_node_id}`` and
``spBv1.0/{group_id}/{DBIRTH|DDEATH|DDATA|DCMD}/{edge_node_id}/{camera}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SPARKPLUG_SAFE = re.compile(r"^[^/+#\s]{1,128}$")
SPARKPLUG_NAMESPACE = "spBv1.0"
CAMERA_VERBS = ("set_thresholds", "set_delta", "enable", "disable", "keyframe")
NODE_VERBS = ("rebirth",)


def check_element(kind: str, value: str) -> str:
    """A topic element from config or from a camera id: letters, digits, '_' and '-' only."""
    if not _SAFE.match(value):
        raise ValueError(f"{kind} {value!r} is not topic-safe: use 1-64 letters, digits, '_' or '-'")
    return value


@dataclass(frozen=True, slots=True)
class CommandTopic:
    """A parsed ``{root}/cmd/...`` topic: camera is None for node commands."""

    verb: str
    camera: str | None


class Topics:
    """The deltayolo JSON topic tree of one node."""

    def __init__(self, site: str, area: str, line: str, node: str) -> None:
        parts = [check_element("site", site), check_element("area", area), check_element("line", line)]
        self.root = "/".join([*parts, "deltayolo", check_element("node", node)])
        self._cmd_prefix = self.root + "/cmd/"

    @property
    def status(self) -> str:
        return self.root + "/status"

    @property
    def stats(self) -> str:
        return self.root + "/stats"

    @property
    def ack(self) -> str:
        return self.root + "/ack"

    @property
    def commands_filter(self) -> str:
        return self.root + "/cmd/#"

    @property
    def everything_filter(self) -> str:
        return self.root + "/#"

    def detections(self, camera: str) -> str:
        return f"{self.root}/{check_element('camera', camera)}/detections"

    def errors(self, camera: str) -> str:
        return f"{self.root}/{check_element('camera', camera)}/errors"

    def state(self, camera: str) -> str:
        return f"{self.root}/{check_element('camera', camera)}/state"

    def availability(self, camera: str) -> str:
        return f"{self.root}/{check_element('camera', camera)}/availability"

    def command(self, verb: str, camera: str | None = None) -> str:
        """The topic a client publishes a command to (tests and tools use this too)."""
        if camera is None:
            return self._cmd_prefix + verb
        return f"{self._cmd_prefix}{check_element('camera', camera)}/{verb}"

    def parse_command(self, topic: str) -> CommandTopic:
        """``{root}/cmd/rebirth`` or ``{root}/cmd/{camera}/{verb}``; anything else is a ValueError naming it."""
        if not topic.startswith(self._cmd_prefix):
            raise ValueError(f"topic {topic!r} is not under {self._cmd_prefix}")
        parts = topic[len(self._cmd_prefix):].split("/")
        if len(parts) == 1 and parts[0] in NODE_VERBS:
            return CommandTopic(parts[0], None)
        if len(parts) == 2 and parts[1] in CAMERA_VERBS:
            if not _SAFE.match(parts[0]):
                raise ValueError(f"camera {parts[0][:80]!r} in topic is not a valid camera id")
            return CommandTopic(parts[1], parts[0])
        known = ", ".join([*NODE_VERBS, *(f"{{camera}}/{v}" for v in CAMERA_VERBS)])
        raise ValueError(f"unknown command topic {topic[:200]!r}; known: cmd/{known}")


class SparkplugTopics:
    """Sparkplug B topics of one edge node."""

    def __init__(self, group_id: str, edge_node_id: str) -> None:
        for kind, value in (("group_id", group_id), ("edge_node_id", edge_node_id)):
            if not _SPARKPLUG_SAFE.match(value):
                raise ValueError(f"sparkplug {kind} {value!r} must not contain '/', '+', '#' or spaces")
        self.group_id = group_id
        self.edge_node_id = edge_node_id
        self._base = f"{SPARKPLUG_NAMESPACE}/{group_id}"

    def node(self, message_type: str) -> str:
        """NBIRTH, NDEATH, NDATA, NCMD."""
        return f"{self._base}/{message_type}/{self.edge_node_id}"

    def device(self, message_type: str, camera: str) -> str:
        """DBIRTH, DDEATH, DDATA, DCMD."""
        return f"{self._base}/{message_type}/{self.edge_node_id}/{check_element('camera', camera)}"

    @property
    def group_filter(self) -> str:
        return f"{self._base}/#"

    @property
    def ncmd(self) -> str:
        return self.node("NCMD")


def default_group_id(site: str, area: str, line: str) -> str:
    """The Sparkplug group id used when the config names none."""
    return f"{site}:{area}:{line}"
