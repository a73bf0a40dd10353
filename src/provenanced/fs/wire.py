"""The framed JSON protocol between the daemon and a helper running as a user.

A frame is a 4-byte big-endian length and that many bytes of ASCII JSON. Everything a helper
sends is untrusted (the user may control the process), so frames are bounded before they are
read, and values are decoded into model dataclasses with every field's type checked: never
pickle, never a class named by the sender.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import struct
import types
import typing
from collections.abc import Mapping
from functools import cache
from typing import Any, TypeVar

from provenanced.model import frozen_map

HEADER = struct.Struct(">I")
# A request carries at most a batch of paths; a reply at most a batch of facts (see asuser.py).
REQUEST_MAX = 4 << 20
REPLY_MAX = 16 << 20

T = TypeVar("T")


class WireError(ValueError):
    """A frame or a value that breaks the protocol: too large, not JSON, or of the wrong shape."""


def encode_frame(message: Mapping[str, Any], limit: int) -> bytes:
    """One frame holding ``message``; WireError if it would exceed ``limit`` bytes."""
    # ensure_ascii: undecodable path bytes (surrogate escapes) survive as \\udcXX escapes.
    body = json.dumps(message, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    if len(body) > limit:
        raise WireError(f"message of {len(body)} bytes exceeds the {limit} byte limit")
    return HEADER.pack(len(body)) + body


def frame_length(header: bytes, limit: int) -> int:
    """The body length announced by ``header``; WireError beyond ``limit``, before reading it."""
    length: int = HEADER.unpack(header)[0]
    if length > limit:
        raise WireError(f"frame of {length} bytes announced, limit {limit}")
    return length


def decode_body(body: bytes) -> dict[str, Any]:
    """The JSON object a frame body holds."""
    try:
        message = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(f"frame is not ASCII JSON: {exc}") from None
    if not isinstance(message, dict):
        raise WireError("frame is not a JSON object")
    return message


def to_wire(value: Any) -> Any:
    """A model value (dataclass, enum, tuple, mapping) as plain JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple | list):
        return [to_wire(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): to_wire(v) for k, v in value.items()}
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_wire(kind: type[T], data: Any, where: str = "value") -> T:
    """Decode ``data`` as ``kind``, checking every field; WireError names the first bad one."""
    return typing.cast(T, _decode(kind, data, where))


def optional_from_wire(kind: type[T], data: Any, where: str = "value") -> T | None:
    """``from_wire`` for a value that may be absent (JSON null)."""
    return None if data is None else from_wire(kind, data, where)


def _decode(kind: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _decode(option, data, where)
            except WireError:
                continue
        raise WireError(f"{where}: {data!r:.80} is none of {kind}")
    if kind is type(None):
        if data is None:
            return None
    elif origin is typing.Literal:
        if data in args:
            return data
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if isinstance(data, list):
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
    elif origin in (Mapping, dict) and args and args[0] is str:
        if isinstance(data, dict):
            return frozen_map({k: _decode(args[1], v, f"{where}[{k!r}]") for k, v in data.items()})
    elif isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(data)
        except ValueError:
            pass
    elif isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _decode_dataclass(kind, data, where)
    elif kind is float:
        if isinstance(data, int | float) and not isinstance(data, bool):
            return float(data)
    elif kind in (str, int, bool):
        # bool is an int in Python, never on the wire.
        if type(data) is kind:
            return data
    else:
        raise WireError(f"{where}: {kind} cannot cross the wire")
    raise WireError(f"{where}: {data!r:.80} is not a {kind}")


def _decode_dataclass(kind: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise WireError(f"{where}: expected an object for {kind.__name__}")
    hints = _hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind) if f.init}
    unknown = set(data) - set(fields)
    if unknown:
        raise WireError(f"{where}: unknown fields {sorted(unknown)} for {kind.__name__}")
    values = {
        name: _decode(hints[name], data[name], f"{where}.{name}") for name in fields if name in data
    }
    try:
        return kind(**values)
    except TypeError as exc:  # a required field is missing
        raise WireError(f"{where}: {exc}") from None
