"""Job files to typed options: the machinery srtrain.config and tune.space declare theirs with.

A job file is YAML (`read_yaml`), edited by repeatable `--set dotted.key=value` overrides
(`apply_overrides`). Its sections are frozen dataclasses whose fields are declared with
`option(default, *rules)`: the default, the comment that documents it and the rules on its value
sit together. `build(cls, data, path)` reads plain data into the dataclass (unknown keys and
values of the wrong type are errors) and `validate(obj, path, cfg)` applies every rule. Every
problem raises `ConfigError`: one line that starts with the dotted key path, which the entry
points print before exiting 2.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A job configuration problem a user can fix; the message names the key path."""


@dataclass(frozen=True)
class Rule:
    """A value of an option passes `ok(value)`; else the error says `path: got X, allowed: Y`.

    A rule that depends on other options names them in `given(section, cfg)` (the section holding
    the option and the training config) and then decides `ok(value, given)`, with `allowed`
    formatted by the given value. Such rules run after every rule without `given`, so what they
    read has passed its own checks.
    """

    ok: Callable[..., bool]
    allowed: str
    given: Callable[[Any, Any], Any] | None = None


def at_least(low: float, note: str = "") -> Rule:
    """`value >= low`; an int bound says "an integer", a float bound "a number"."""
    kind = "an integer" if isinstance(low, int) else "a number"
    return Rule(lambda v: v >= low, f"{kind} >= {low:g}" + (f" ({note})" if note else ""))


def option(
    default: Any = dataclasses.MISSING,
    *rules: Rule,
    each_key: Rule | None = None,
    each_value: Rule | None = None,
    parse: Callable[[Any, str], Any] | None = None,
    derived: bool = False,
) -> Any:
    """A dataclass field with the rules on its value.

    A mapping default is copied for each instance. `each_key` / `each_value` check a mapping's
    entries (the error names `path.key`). `parse(value, path)` reads the field from plain data
    where its type annotation cannot say how; an option without a default is read as null when
    it is missing, so its parser says what is wanted. A `derived` field is filled in by code,
    never read from a job.
    """
    meta = {
        "rules": rules,
        "each_key": each_key,
        "each_value": each_value,
        "parse": parse,
        "derived": derived,
    }
    if isinstance(default, Mapping):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require_mapping(data: Any, path: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of keys, got {data!r}")
    return data


# --- overrides ----------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key.strip()):
        raise ConfigError(f"--set {text!r}: expected dotted.key=value, e.g. train.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML 1.1 reads "1e-3" as a string; the field's type decides, so try a number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?[\d.]+e[-+]?\d+", value, re.I) else value
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Sets each dotted key in nested plain data (a copy); the Config build validates it."""
    data = _deep_copy(data)
    for text in overrides:
        data = with_value(data, *parse_override(text))
    return data


def with_value(data: Mapping[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """A copy of nested plain data with `value` at the key path `keys` (levels made as needed)."""
    data = _deep_copy(data)
    node = data
    for k in keys[:-1]:
        child = node.get(k)
        if not isinstance(child, dict):
            child = {}
            node[k] = child
        node = child
    node[keys[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    return data


# --- reading job files --------------------------------------------------------------------------


class _JobLoader(yaml.SafeLoader):
    """YAML 1.1 reads a plain `on`, `off`, `yes` or `no` as a boolean, keys included; a job's keys
    are names (`degradation.on`), so a key is kept as the text written. Values are unchanged."""


def _mapping_with_named_keys(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    loader.flatten_mapping(node)
    return {
        (k.value if k.tag == "tag:yaml.org,2002:bool" else loader.construct_object(k, deep=True)): (
            loader.construct_object(v, deep=True)
        )
        for k, v in node.value
    }


_JobLoader.add_constructor("tag:yaml.org,2002:map", _mapping_with_named_keys)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: job file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read job file ({e.strerror})") from None
    try:
        data = yaml.load(text, Loader=_JobLoader)  # a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: invalid YAML ({problem})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


# --- building from plain data -------------------------------------------------------------------


def build(cls: type, data: Any, path: str) -> Any:
    """The dataclass `cls` from a mapping of its field names (None: all defaults)."""
    if data is None:
        data = {}
    require_mapping(data, path or "the job file")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in fields:
            raise ConfigError(f"{key_path}: unknown key (allowed: {', '.join(fields)})")
        kwargs[key] = _read(value, hints[key], fields[key], key_path)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in kwargs:
            kwargs[name] = _read(None, hints[name], f, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _read(value: Any, tp: Any, f: dataclasses.Field, path: str) -> Any:
    parse = f.metadata.get("parse")
    return parse(value, path) if parse else _coerce(value, tp, path)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        k, v = typing.get_args(tp)
        return f"a mapping of {_type_name(k)} to {_type_name(v)}"
    return {type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Checks `value` (from YAML) against the annotation `tp`; returns it in the field's type."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{path}: got {value!r}, expected one of {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                pass
        raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")
        return {_coerce(k, ktp, path): _coerce(v, vtp, f"{path}.{k}") for k, v in value.items()}
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    raise ConfigError(f"{path}: got {value!r}, expected {_type_name(tp)}")


# --- checking -----------------------------------------------------------------------------------


def validate(obj: Any, path: str, cfg: Any) -> None:
    """Applies the rules of every option of `obj` and of its nested sections; `cfg` is what a
    rule's `given` reads besides the option's own section (the training config)."""
    for dependent in (False, True):
        for section, f, value, key_path in _options(obj, path):
            for rule in f.metadata.get("rules", ()):
                if (rule.given is not None) == dependent:
                    _apply(rule, value, key_path, section, cfg)
            if dependent or not isinstance(value, Mapping):
                continue
            key_rule, value_rule = f.metadata.get("each_key"), f.metadata.get("each_value")
            for k, v in value.items():
                if key_rule:
                    _apply(key_rule, k, f"{key_path}.{k}", section, cfg)
                if value_rule:
                    _apply(value_rule, v, f"{key_path}.{k}", section, cfg)


def _options(obj: Any, path: str):
    """(section, field, value, dotted path) of every option below `obj`, in declaration order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key_path = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(value):
            yield from _options(value, key_path)
        else:
            yield obj, f, value, key_path


def _apply(rule: Rule, value: Any, path: str, section: Any, cfg: Any) -> None:
    if rule.given is None:
        ok, allowed = rule.ok(value), rule.allowed
    else:
        given = rule.given(section, cfg)
        ok, allowed = rule.ok(value, given), rule.allowed.format(given)
    if not ok:
        raise ConfigError(f"{path}: got {value!r}, allowed: {allowed}")
