"""Configs: YAML files plus dotted `key.path=value` overrides, validated into pydantic models.

Every stage has one pydantic model; a bad key, type or path fails here, before any work,
with one line that names the key and what would be accepted.
"""
from __future__ import annotations

from pathlib import Path
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.errors import UserError


class ConfigError(UserError):
    """A config that cannot be used; the message is one line naming the key or file."""


class Strict(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


M = TypeVar("M", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `a.b.c=value` into its key path and a YAML-parsed value (so 1e-3, true, [1,2] work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return data


def format_validation_error(err: ValidationError) -> str:
    """One line per problem: `key.path: message (got value)`."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":  # a validator's own message: drop pydantic's "Value error, " prefix
            msg = msg.removeprefix("Value error, ")
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{key}: {msg}{shown}")
    return "; ".join(lines)


def config_tree(path: str | Path | None = None, overrides: list[str] | None = None, flags: dict | None = None) -> dict:
    """The raw settings: the YAML file, then `flags` ({key.path: value}), then the key.path=value overrides."""
    tree: dict = read_yaml(path) if path is not None else {}
    for key, value in (flags or {}).items():
        set_dotted(tree, key.split("."), value)
    for item in overrides or []:
        keys, value = parse_override(item)
        set_dotted(tree, keys, value)
    return tree


def validate(model: type[M], tree: dict) -> M:
    """`model` from a settings tree (over its defaults); a ConfigError names every bad key."""
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def load_config(model: type[M], path: str | Path | None = None, overrides: list[str] | None = None,
                flags: dict | None = None) -> M:
    """Build `model` from its defaults, then the YAML file, then `flags` ({key.path: value}), then the overrides."""
    return validate(model, config_tree(path, overrides, flags))


def _type_name(ann) -> str:
    if get_origin(ann) is Literal:
        return "|".join(str(a) for a in get_args(ann))
    if get_origin(ann) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    return "None" if ann is type(None) else getattr(ann, "__name__", str(ann))


def config_reference(model: type[BaseModel], prefix: str = "") -> list[str]:
    """One line per key: `key.path  type = default  description`, for --help and the README."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines += config_reference(ann, key + ".")
            continue
        default = "required" if field.is_required() else field.get_default(call_default_factory=True)
        default = str(default) if isinstance(default, Path) or default == "required" else repr(default)
        type_name = _type_name(ann)
        desc = f"  {field.description}" if field.description else ""
        lines.append(f"  {key}  {type_name} = {default}{desc}")
    return lines


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config, so a run can be repeated from its own directory."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
