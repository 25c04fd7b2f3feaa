"""Typed configuration machinery: dataclasses (a docstring per field) built from YAML plus dotted overrides.

The dataclasses themselves live with their owners (`moe/config.py`, `data/config.py`,
`parallel/config.py`, `launcher/config.py`); this module only turns nested dictionaries into them and
raises `ConfigError` with a one-line message that names the field and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from competesmoe.common.errors import ConfigError

_UNION_TYPES = (typing.Union, types.UnionType)


def check(ok: bool, message: str) -> None:
    """Raise ConfigError(message) unless ok."""
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------------ YAML


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A key written twice in one mapping (PyYAML alone would keep the last without a word)."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers, refusing duplicate keys.

    Numbers: `1e-3`, `5E4` and `.5` are floats (PyYAML follows YAML 1.1, which wants a dot and a signed exponent,
    `1.0e-3`, and reads `1e-3` as text); `0x1F` and `0o17` are hex and octal, `017` is 17 (YAML 1.1: 15); digits may
    be grouped with `_` (`100_000_000`); `1:30` and `0b101` are text (YAML 1.1: 90 and 5). Booleans, null and text
    are read as PyYAML reads them. A key given twice in one mapping is an error (a merge key's `<<` entries may be
    overridden, as YAML allows).
    """

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers
                                       if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, typing.Hashable) and key in seen:
                    raise DuplicateKeyError("while reading a mapping", node.start_mark,
                                            f"key {key!r} appears twice in it (YAML keeps only the last); remove one",
                                            key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node) -> int:
        text = self.construct_scalar(node).replace("_", "")
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0x": 16, "0o": 8}.get(digits[:2].lower(), 10)
        return sign * int(digits if base == 10 else digits[2:], base)


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^[-+]?(?:[0-9][0-9_]*|0[xX][0-9a-fA-F_]+|0o[0-7_]+)$"),
    list("-+0123456789"))
ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*|[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))
ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_yaml_int)


def load_yaml(text: str) -> Any:
    """What a YAML text holds, read by ConfigLoader; yaml.YAMLError where it is not valid YAML."""
    return yaml.load(text, Loader=ConfigLoader)  # a SafeLoader: builds only plain data


def yaml_problem(err: yaml.YAMLError) -> str:
    """' (line N: what is wrong)' for a YAML error, as much of it as the error knows."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None)
    where = f"line {mark.line + 1}" if mark is not None else ""
    text = ": ".join(part for part in (where, problem) if part)
    return f" ({text})" if text else ""


# ------------------------------------------------------------------------------------------- coercion


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in _UNION_TYPES:
        return " | ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


@dataclasses.dataclass(frozen=True)
class OverrideValue:
    """A command-line override's value: the text as typed and what YAML reads in it. A field of text type gets the
    text byte for byte (`output_dir=/runs/exp #3` keeps its ' #3', which YAML reads as a comment; `output_dir=2024`
    is the text 2024), unless the text is quoted for YAML ('my dir') or is null; every other field gets YAML's
    value (`train.lr=1e-3` is a float, `data.inputs=[a.txt, b.txt]` a list)."""

    text: str
    parsed: Any

    def for_type(self, tp: Any) -> Any:
        wants_text = tp is str or (get_origin(tp) in _UNION_TYPES and str in get_args(tp))
        if not wants_text or self.parsed is None or self.text.strip()[:1] in ("'", '"'):
            return self.parsed
        return self.text


def _coerce(value: Any, tp: Any, where: str) -> Any:
    if isinstance(value, OverrideValue):
        value = value.for_type(tp)
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{where} = {value!r} is not one of {_type_name(tp)}; set {where} to one of them")
    if origin in _UNION_TYPES:
        if value is None and type(None) in get_args(tp):
            return None
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} = {value!r} has the wrong type; expected a list (YAML [a, b])")
        (item,) = get_args(tp) or (None,)
        if item is None:  # an untyped list (data.blend's [weight, path] pairs): its owner checks the items
            return _finite_everywhere(value, where)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if value is None:  # a section whose every line is commented out: its defaults
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of fields (a section), got {value!r}")
        return build(tp, value, where)
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """bool, int, float or str. An int field takes a whole float too (8.0, 1e4: YAML's only short spelling of big
    numbers), a float field an int; neither takes a bool, and no number may be nan or infinite."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (tp is bool and isinstance(value, bool)) or (tp is str and isinstance(value, str)):
        return value
    if tp is int and number:
        if float(_finite(value, where)).is_integer():
            return int(value)
        raise ConfigError(f"{where} = {value!r} must be a whole number")
    if tp is float and number:
        return float(_finite(value, where))
    hint = f" (quote it to make it text: '{value}')" if tp is str and (number or isinstance(value, bool)) else ""
    raise ConfigError(f"{where} = {value!r} has the wrong type; expected {_type_name(tp)}{hint}")


def _finite(value: Any, where: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value} is not a finite number; give a real value")
    return value


def _finite_everywhere(value: Any, where: str) -> Any:
    """value, after refusing any nan or infinity inside it."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _finite_everywhere(item, f"{where}[{i}]")
    return _finite(value, where)


def build(cls: type, values: dict, prefix: str = "") -> Any:
    """cls(**values) with every value type-checked; unknown keys are refused with the closest known one."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix + '.' if prefix else ''}{close[0]}?" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'{hint}")
        kwargs[key] = _coerce(value, hints[key], where)
    return cls(**kwargs)


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """tree['a']['b'] = value for dotted 'a.b', creating sections as needed."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override '{dotted}': the key has an empty part; write section.key=value "
                          f"(e.g. train.max_steps=40)")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, OverrideValue):  # a section given whole by an earlier override
            child = node[part] = child.parsed
        if child is None:  # absent, or a section left empty in the file
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, OverrideValue]:
    """'a.b=3' -> ('a.b', OverrideValue('3', 3)): the value as typed and as YAML (ConfigLoader) reads it, so that
    numbers and booleans keep their type and text stays text (OverrideValue)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=40)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), OverrideValue(raw, value)


def read_yaml_tree(path: str | Path) -> dict:
    """The mapping a YAML config file holds (an empty file is an empty mapping)."""
    path = Path(path)
    fix = "pass a YAML file such as configs/tiny-cpu.yaml"
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; {fix}")
    if not path.is_file():
        raise ConfigError(f"config file {path} is not a file; {fix}")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read ({err.strerror}); {fix}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (invalid byte at offset {err.start}); "
                          f"save it as UTF-8") from None
    try:
        tree = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML{yaml_problem(err)}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} must hold a mapping of config sections at top level")
    return tree
