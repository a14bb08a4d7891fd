"""YAML -> Config, with every error pointing at its file and line."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from daemon.config.model import Config

MAX_CONFIG_BYTES = 4 * 1024 * 1024
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    file: str
    line: int
    key_path: str
    value: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.key_path:
            return f"{where} {self.key_path} = {self.value}: {self.message}"
        return f"{where} {self.message}"


class ConfigError(Exception):
    """The config could not be loaded; ``issues`` holds one entry per problem."""

    def __init__(self, issues: Sequence[ConfigIssue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        if p.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError([ConfigIssue(str(p), 1, "", "", f"file is larger than {MAX_CONFIG_BYTES} bytes")])
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), 0, "", "", f"cannot read config: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(str(p), 1, "", "", f"not UTF-8 text: {exc.reason}")]) from exc
    return parse_config(text, str(p))


def parse_config(text: str, filename: str = "<config>") -> Config:
    return parse_yaml_model(text, filename, Config, "config")


def parse_yaml_model(text: str, filename: str, model: type[M], what: str) -> M:
    """YAML text -> a strict model; every problem is a ConfigIssue with file, line and key path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(filename, line, "", "", f"YAML syntax error: {problem}")]) from exc
    if not isinstance(data, dict):
        raise ConfigError([ConfigIssue(filename, 1, "", "", f"the {what} must be a YAML mapping")])
    reject_duplicate_keys(node, filename)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_issues(exc, node, data, filename)) from exc


def reject_duplicate_keys(node: yaml.Node | None, filename: str) -> None:
    issues: list[ConfigIssue] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode):
                    if k.value in seen:
                        issues.append(ConfigIssue(filename, k.start_mark.line + 1, k.value, "", "duplicate key"))
                    seen.add(k.value)
                stack.append(v)
        elif isinstance(n, yaml.SequenceNode):
            stack.extend(n.value)
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: i.line))


def validation_issues(exc: ValidationError, root: yaml.Node | None, data: Any, filename: str) -> list[ConfigIssue]:
    out: list[ConfigIssue] = []
    errors = exc.errors(include_url=False)
    locs = [tuple(e["loc"]) for e in errors]
    for err in errors:
        raw_loc = tuple(err["loc"])
        if any(len(o) > len(raw_loc) and o[: len(raw_loc)] == raw_loc for o in locs):
            continue  # a consequence of a deeper error that is reported itself
        message = err["msg"]
        if err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            key = str(ctx.get("discriminator", "type")).strip("'")
            raw_loc = (*raw_loc, key)
            message = f"unknown {key}; expected one of {ctx.get('expected_tags', '')}"
        loc, line, value = _locate(root, data, raw_loc)
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif message.startswith("Value error, "):
            message = message[len("Value error, "):]
        out.append(ConfigIssue(filename, line, _key_path(loc), value, message))
    return out


def _locate(root: yaml.Node | None, data: Any, loc: tuple[int | str, ...]) -> tuple[list[int | str], int, str]:
    """Follow ``loc`` through the YAML nodes; discriminator tags in pydantic locs that are no keys are skipped."""
    node, value, path = root, data, []
    line = 1 if root is None else root.start_mark.line + 1
    for i, part in enumerate(loc):
        found = _child(node, part)
        if found is None:
            if i == len(loc) - 1:  # a missing key: name it, stay on its parent's line
                path.append(part)
                value = None
            continue  # else a union tag such as 'replay'
        key_line, node = found
        path.append(part)
        line = key_line + 1
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            value = None
    return path, line, _show(value) if path else ""


def _child(node: yaml.Node | None, part: int | str) -> tuple[int, yaml.Node] | None:
    """The child node and the line (0-based) that names it: the key's line for mappings."""
    if isinstance(node, yaml.MappingNode) and isinstance(part, str):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == part:
                return k.start_mark.line, v
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        child: yaml.Node = node.value[part]
        return child.start_mark.line, child
    return None


def _key_path(loc: list[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, list):
        short = len(value) <= 8 and all(isinstance(v, int | float | str | bool) for v in value)
        return repr(value) if short else "[...]"
    text = repr(value) if isinstance(value, str) else str(value)
    if value is None:
        text = "(missing)"
    return text if len(text) <= 60 else text[:57] + "..."
