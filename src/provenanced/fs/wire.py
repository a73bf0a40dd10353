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
from collections.abc import Callable, Mapping
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


Decoder = Callable[[Any], Any]


class _Bad(Exception):
    """A value that is not what its annotation says; ``path`` grows as it climbs out."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def from_wire(kind: type[T], data: Any, where: str = "value") -> T:
    """Decode ``data`` as ``kind``, checking every field; WireError names the first bad one."""
    try:
        # Type objects and generic aliases hash fine; typeshed's type[T] just does not say so.
        return typing.cast(T, _decoder(typing.cast(Any, kind))(data))
    except _Bad as bad:
        raise WireError(f"{where}{''.join(bad.path)}: {bad.message}") from None


def optional_from_wire(kind: type[T], data: Any, where: str = "value") -> T | None:
    """``from_wire`` for a value that may be absent (JSON null)."""
    return None if data is None else from_wire(kind, data, where)


@cache
def _decoder(kind: Any) -> Decoder:
    """A checking decoder for one annotation, built once: replies hold thousands of facts."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return _union(kind, [_decoder(a) for a in args])
    if origin is typing.Literal:
        return _check(kind, lambda data: data in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return _sequence(_decoder(args[0]))
    if origin in (Mapping, dict) and args and args[0] is str:
        return _mapping(_decoder(args[1]))
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return _enum(kind)
    if isinstance(kind, type) and dataclasses.is_dataclass(kind):
        return _dataclass(kind)
    if kind is float:
        return _check(kind, lambda data: type(data) in (int, float), float)
    if kind in (str, int, bool, type(None)):
        # Exact types: bool is an int in Python, never on the wire.
        return _check(kind, lambda data: type(data) is kind)
    raise TypeError(f"{kind} cannot cross the wire")


def _check(
    kind: Any, accepts: Callable[[Any], bool], convert: Callable[[Any], Any] | None = None
) -> Decoder:
    def decode(data: Any) -> Any:
        if not accepts(data):
            raise _Bad(f"{data!r:.80} is not a {kind}")
        return data if convert is None else convert(data)

    return decode


def _union(kind: Any, options: list[Decoder]) -> Decoder:
    def decode(data: Any) -> Any:
        for option in options:
            try:
                return option(data)
            except _Bad:
                continue
        raise _Bad(f"{data!r:.80} is none of {kind}")

    return decode


def _enum(kind: type[enum.Enum]) -> Decoder:
    def decode(data: Any) -> Any:
        try:
            return kind(data)
        except ValueError:
            raise _Bad(f"{data!r:.80} is not a {kind.__name__}") from None

    return decode


def _sequence(item: Decoder) -> Decoder:
    def decode(data: Any) -> Any:
        if not isinstance(data, list):
            raise _Bad(f"expected a list, got {type(data).__name__}")
        values = []
        for index, value in enumerate(data):
            try:
                values.append(item(value))
            except _Bad as bad:
                bad.path.insert(0, f"[{index}]")
                raise
        return tuple(values)

    return decode


def _mapping(item: Decoder) -> Decoder:
    def decode(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Bad(f"expected an object, got {type(data).__name__}")
        values = {}
        for key, value in data.items():
            try:
                values[key] = item(value)
            except _Bad as bad:
                bad.path.insert(0, f"[{key!r:.80}]")
                raise
        return frozen_map(values)

    return decode


def _dataclass(kind: type) -> Decoder:
    hints = typing.get_type_hints(kind)
    fields = [(f.name, _decoder(hints[f.name])) for f in dataclasses.fields(kind) if f.init]
    names = frozenset(name for name, _ in fields)

    def decode(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Bad(f"expected an object for {kind.__name__}")
        unknown = data.keys() - names
        if unknown:
            raise _Bad(f"unknown fields {sorted(unknown)!r:.200} for {kind.__name__}")
        values = {}
        for name, field in fields:
            if name in data:
                try:
                    values[name] = field(data[name])
                except _Bad as bad:
                    bad.path.insert(0, f".{name}")
                    raise
        try:
            return kind(**values)
        except TypeError as exc:  # a required field is missing
            raise _Bad(str(exc)) from None

    return decode
