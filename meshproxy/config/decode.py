"""Strict, Traefik-compatible decoding of raw YAML/JSON into typed structs.

Traefik matches keys case-insensitively against field names and rejects unknown keys; msgspec
matches exactly. So a first pass walks the raw data with the struct's type hints, renames keys
to their canonical spelling and records every unknown key with its JSON path; msgspec then
converts types (strings to ints, durations, ...) and reports the path of any mismatch.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
import yaml

from meshproxy.config.durations import Duration, format_duration, parse_duration

T = TypeVar("T")


@dataclass(frozen=True)
class ConfigError:
    """One problem in a configuration, located by its JSON path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigDecodeError(Exception):
    """A payload that cannot be decoded at all; carries every error found."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = errors
        super().__init__("; ".join(str(e) for e in errors))


# Bounds on what one document may expand to once YAML aliases are followed. A real dynamic
# configuration nests about ten levels and has at most tens of thousands of values; the bounds
# stop a recursive alias (`a: &a [*a]`) or an alias bomb ("billion laughs": each level
# referring several times to the previous one) before the decoder walks it forever. go-yaml,
# which Traefik uses, refuses such documents too ("document contains excessive aliasing").
MAX_DEPTH = 100
MAX_NODES = 1_000_000


def load_text(data: bytes | str) -> Any:
    """Parse YAML (JSON is YAML) into plain Python data.

    Raises ConfigDecodeError for invalid YAML, integers too long for Python to convert
    (over 4300 digits), nesting deeper than MAX_DEPTH and documents expanding to more than
    MAX_NODES values (aliases included).
    """
    try:
        value = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "document"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigDecodeError(
            [ConfigError("$", f"invalid YAML/JSON at {where}: {problem}")]
        ) from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigDecodeError(
            [ConfigError("$", f"invalid YAML/JSON: nested deeper than {MAX_DEPTH} levels")]
        ) from None
    except (ValueError, OverflowError) as exc:  # e.g. int() of a 5000-digit scalar
        raise ConfigDecodeError([ConfigError("$", f"invalid YAML/JSON: {exc}")]) from None
    if isinstance(value, (dict, list)):
        check_shape(value)
    return value


def _shape_error(message: str) -> ConfigDecodeError:
    return ConfigDecodeError([ConfigError("$", message)])


def _check_text(text: str) -> None:
    """A `\\uD800`-style escape gives Python a lone surrogate, which no encoder can write
    back; go-yaml refuses such escapes ("found invalid Unicode character escape code")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _shape_error(
            f"invalid Unicode character escape code (a surrogate) in {text[:40]!r}"
        ) from None


def check_shape(value: Any) -> None:
    """Raise ConfigDecodeError if `value` nests deeper than MAX_DEPTH, refers to itself
    (a recursive alias), or expands (aliases followed, as the decoder will follow them) to
    more than MAX_NODES values.

    Also refuses strings (keys or values) holding surrogate code points (`"\\ud800"`).
    Shared collections (YAML aliases) are measured once: the walk is linear in the document's
    size, however large its expansion (an alias bomb is refused in microseconds).
    """
    size: dict[int, int] = {}  # id of a collection -> values in its expansion, itself included
    height: dict[int, int] = {}  # id of a collection -> nesting levels from it down
    open_ids: set[int] = set()  # collections whose children are being measured
    stack: list[tuple[Any, int, bool]] = [(value, 0, False)]
    while stack:
        node, depth, measured = stack.pop()
        children = list(node.values()) if isinstance(node, dict) else node
        key = id(node)
        if measured:
            open_ids.discard(key)
            size[key] = 1 + sum(size.get(id(c), 1) for c in children)
            height[key] = 1 + max((height.get(id(c), 0) for c in children), default=0)
            if size[key] > MAX_NODES:
                raise _shape_error(
                    f"the document expands to more than {MAX_NODES} values (excessive YAML aliases)"
                )
            continue
        if key in open_ids:
            raise _shape_error("a YAML alias refers to the collection that contains it")
        if key in size:
            if depth + height[key] > MAX_DEPTH:
                raise _shape_error(f"nested deeper than {MAX_DEPTH} levels")
            continue
        if depth >= MAX_DEPTH:
            raise _shape_error(f"nested deeper than {MAX_DEPTH} levels")
        for text in (*node, *children) if isinstance(node, dict) else children:
            if isinstance(text, str):
                _check_text(text)
        open_ids.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if isinstance(c, (dict, list)))
    return


def join_path(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    text = str(key)
    if text.replace("_", "").replace("-", "").isalnum() and "." not in text:
        return f"{path}.{text}" if path else text
    return f'{path}["{text}"]'


@functools.cache
def _field_map(struct_type: type) -> dict[str, tuple[str, Any]]:
    """lower-cased encoded name -> (encoded name, type hint)."""
    hints = typing.get_type_hints(struct_type)
    out: dict[str, tuple[str, Any]] = {}
    for field in msgspec.structs.fields(struct_type):
        out[field.encode_name.lower()] = (field.encode_name, hints[field.name])
    return out


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _unwrap_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def normalize(
    value: Any, tp: Any, path: str, errors: list[ConfigError], *, strict: bool = True
) -> Any:
    """Rename keys to their canonical spelling for `tp`; record unknown keys (dropped if lax)."""
    tp = _unwrap_optional(tp)
    if value is None:
        return None
    if _is_struct(tp):
        if not isinstance(value, dict):
            return value  # msgspec reports the type error with its path
        fields = _field_map(tp)
        out: dict[str, Any] = {}
        for key, item in value.items():
            entry = fields.get(str(key).lower())
            if entry is None:
                if strict:
                    errors.append(ConfigError(join_path(path, key), "field not found"))
                else:
                    errors.append(ConfigError(join_path(path, key), "unknown option, ignored"))
                continue
            name, sub_type = entry
            if item is None:
                continue  # Traefik skips null values
            out[name] = normalize(item, sub_type, join_path(path, name), errors, strict=strict)
        return out
    origin = typing.get_origin(tp)
    if origin is list and isinstance(value, list):
        (item_type,) = typing.get_args(tp) or (Any,)
        return [
            normalize(v, item_type, join_path(path, i), errors, strict=strict)
            for i, v in enumerate(value)
        ]
    if origin is dict and isinstance(value, dict):
        _, item_type = typing.get_args(tp) or (Any, Any)
        return {
            k: normalize(v, item_type, join_path(path, k), errors, strict=strict)
            for k, v in value.items()
        }
    return value


def _dec_hook(tp: type, obj: Any) -> Any:
    if tp is Duration:
        return parse_duration(obj)
    raise TypeError(f"no decoder for {tp!r}")


def _msgspec_path(prefix: str, message: str) -> ConfigError:
    # msgspec: "Expected `int`, got `str` - at `$.servers[0].weight`"
    text, sep, where = message.rpartition(" - at `")
    if not sep:
        return ConfigError(prefix, message)
    where = where.rstrip("`")
    tail = where[1:] if where.startswith("$") else where
    path = (prefix + tail) if prefix else tail.lstrip(".")
    return ConfigError(path, text)


def convert(value: Any, tp: type[T], path: str, errors: list[ConfigError]) -> T | None:
    """Convert normalized data to `tp`, appending a located error on failure."""
    try:
        return msgspec.convert(value, tp, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        errors.append(_msgspec_path(path, str(exc)))
        return None


def to_builtins(obj: Any) -> Any:
    """Structs -> JSON-ready data with Traefik's key names (durations as Go strings)."""
    return msgspec.to_builtins(obj, enc_hook=_enc_hook)


def _enc_hook(value: Any) -> Any:
    if isinstance(value, Duration):
        return format_duration(value)
    raise TypeError(f"cannot encode {type(value).__name__}")
