"""Runtime commands (from MQTT): validated there, applied here to the running node."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pydantic import ValidationError

from daemon.app import Runtime
from daemon.config.model import DeltaConfig
from daemon.delta.tracker import params_from_config
from daemon.publish.commands import (
    CommandOutcome,
    Rebirth,
    RequestKeyframe,
    SetCameraEnabled,
    SetDelta,
    SetThresholds,
)

log = logging.getLogger(__name__)


def validate_delta(settings: Mapping[str, object]) -> Mapping[str, object]:
    """Delta settings from a command: the same strict model as the config file (unknown keys, bounds)."""
    try:
        return DeltaConfig.model_validate(dict(settings)).model_dump()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"delta.{where}: {first['msg']}") from exc


class RuntimeCommands:
    """The CommandHandler MQTT calls; every outcome says what happened, nothing raises."""

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime

    def handle(self, cmd: object) -> CommandOutcome:
        try:
            return self._handle(cmd)
        except Exception as exc:  # a command must never take the node down
            log.exception("command %r failed", cmd)
            return CommandOutcome(False, f"failed: {exc}")

    def _handle(self, cmd: object) -> CommandOutcome:
        rt = self._rt
        if isinstance(cmd, SetThresholds):
            try:
                s = rt.settings.update_thresholds(cmd.camera, cmd.confidence, cmd.iou)
            except KeyError:
                return CommandOutcome(False, f"camera {cmd.camera!r} is not running")
            rt.delta.set_confidence(cmd.camera, s.confidence)  # cached boxes under a raised threshold go at once
            return CommandOutcome(True, f"camera {cmd.camera}: confidence {s.confidence}, iou {s.iou}")
        if isinstance(cmd, SetDelta):
            if cmd.camera not in rt.sources:
                return CommandOutcome(False, f"camera {cmd.camera!r} is not running")
            cfg = DeltaConfig.model_validate(dict(cmd.settings))
            rt.delta.configure(cmd.camera, params_from_config(cfg))
            return CommandOutcome(True, f"camera {cmd.camera}: delta {'on' if cfg.enabled else 'off'}")
        if isinstance(cmd, SetCameraEnabled):
            return self._enable(cmd)
        if isinstance(cmd, RequestKeyframe):
            if rt.delta.request_keyframe(cmd.camera):
                return CommandOutcome(True, f"camera {cmd.camera}: keyframe requested")
            return CommandOutcome(False, f"camera {cmd.camera!r} has no delta caching (every frame is full)")
        if isinstance(cmd, Rebirth):
            return CommandOutcome(True, "rebirth handled by the publisher")
        return CommandOutcome(False, f"unsupported command {type(cmd).__name__}")

    def _enable(self, cmd: SetCameraEnabled) -> CommandOutcome:
        rt = self._rt
        cam = next((c for c in rt.cfg.cameras if c.id == cmd.camera), None)
        if cam is None:
            return CommandOutcome(False, f"camera {cmd.camera!r} is not in the config")
        running = cmd.camera in rt.sources
        if cmd.enabled and not running:
            rt.add_camera(cam)
            return CommandOutcome(True, f"camera {cmd.camera} enabled")
        if not cmd.enabled and running:
            rt.remove_camera(cmd.camera)
            return CommandOutcome(True, f"camera {cmd.camera} disabled")
        return CommandOutcome(True, f"camera {cmd.camera} already {'enabled' if running else 'disabled'}")
