"""Typed, frozen configs: YAML files plus `key=value` overrides, checked before any work starts.

Every stage describes its configuration as frozen dataclasses. A field's documentation lives once,
in `field(metadata={"doc": ...})`; cross-field rules live in one `check()` method per class, which
raises `ValueError` naming the keys. Unknown keys, wrong types and missing required values are
errors that name the key and the file they came from.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from jobs.common.errors import CotdError

T = TypeVar("T")


class ConfigError(CotdError):
    """A configuration problem, already phrased for the user (file, key, what is wrong)."""


def doc(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field carrying its documentation; a mutable default becomes a factory."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"doc": text}, **kw)
    return dataclasses.field(default=default, metadata={"doc": text}, **kw)


class _Override:
    """A command-line value: its text (for str fields) and its YAML reading (for all others)."""

    def __init__(self, text: str):
        self.text = text
        try:
            self.parsed = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            self.parsed = text


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read `path` (YAML mapping), apply `key=value` overrides (dotted keys reach nested sections),
    and build a checked `cls`."""
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key=value (for example out_dir=runs/q1)")
        _set_dotted(data, key.strip(), _Override(value), item)
    if overrides:
        source += " (with command-line overrides)"
    return build(cls, data, source=source)


def _set_dotted(data: dict, key: str, value: Any, item: str) -> None:
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[leaf] = value


def build(cls: type[T], data: Any, *, source: str = "<config>", prefix: str = "") -> T:
    """Build dataclass `cls` from plain data, checking keys and types, then run every `check()`."""
    obj = _build(cls, data, source, prefix)
    _run_checks(obj, source, prefix)
    return obj


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if isinstance(data, _Override):
        data = data.parsed
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix or 'top level'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(known))
    if unknown:
        names = ", ".join(sorted(known))
        raise ConfigError(f"{source}: unknown key {_key(prefix, str(unknown[0]))!r} (known keys here: {names})")
    kwargs = {}
    for name, f in known.items():
        key = _key(prefix, name)
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], source, key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {key!r}: {f.metadata.get('doc', '')}".rstrip(": "))
    return cls(**kwargs)


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, _Override) and value.parsed is None and value.text in ("", "null", "None", "~")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        if all(dataclasses.is_dataclass(a) for a in options) and len(options) > 1:
            return _convert_tagged(options, value, source, key)
        errors = []
        for a in options:
            try:
                return _convert(a, value, source, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if len(options) == 1 else f"{source}: {key}: expected one of {_type_name(tp)}, got {_describe(_plain(value))}")
    if isinstance(value, _Override):
        value = value.text if tp is str else value.parsed
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_describe(value)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key}: expected a list, got {_describe(value)}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key}: expected a list of {len(args)} items, got {len(value)}")
            return tuple(_convert(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: expected a mapping, got {_describe(value)}")
        val_tp = args[1] if args else Any
        return {str(k): _convert(val_tp, v, source, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"config type {tp!r} at {key} is not supported by the loader")


def _convert_tagged(options: list[type], value: Any, source: str, key: str) -> Any:
    """A union of dataclasses is told apart by its `type` field (a Literal)."""
    value = _plain(value)
    tags = {tag: o for o in options for tag in typing.get_args(typing.get_type_hints(o)["type"])}
    if not isinstance(value, dict) or "type" not in value:
        raise ConfigError(f"{source}: {key}: expected a mapping with a 'type' key (one of {', '.join(map(repr, tags))})")
    if value["type"] not in tags:
        raise ConfigError(f"{source}: {key}.type: must be one of {', '.join(map(repr, tags))}, got {value['type']!r}")
    return _build(tags[value["type"]], value, source, key)


def _run_checks(obj: Any, source: str, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        for child, sub in _children(getattr(obj, f.name), _key(prefix, f.name)):
            _run_checks(child, source, sub)
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ValueError as e:
            where = f"{prefix}: " if prefix else ""
            raise ConfigError(f"{source}: {where}{e}") from None


def _children(value: Any, key: str):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        yield value, key
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if dataclasses.is_dataclass(v):
                yield v, f"{key}[{i}]"


def to_dict(obj: Any) -> Any:
    """Plain data (for manifests and YAML dumps) from a config object."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def field_docs(cls: type, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, Any]]:
    """(key, doc, default) for every field, nested sections included; used by `cotd config`.
    A section whose default is an instance documents that instance's values."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = _key(prefix, f.name)
        tp = hints[f.name]
        default = getattr(defaults, f.name) if defaults is not None else (
            f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)"))
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key, default if dataclasses.is_dataclass(default) else None))
            continue
        rows.append((key, f.metadata.get("doc", ""), default))
    return rows


def _plain(value: Any) -> Any:
    return value.parsed if isinstance(value, _Override) else value


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(tp) if a is not type(None))
