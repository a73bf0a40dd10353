"""The helper protocol's frames and values: bounded, typed, and never trusting the sender."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from provenanced.fs import wire
from provenanced.model import (
    ExpectedLink,
    FileFact,
    FileKind,
    Finding,
    FindingKind,
    HomeManagerGeneration,
    Tier,
    UnitDir,
    frozen_map,
)

FACT = FileFact(
    path="/home/u/.config/systemd/user/web.service",
    kind=FileKind.SYMLINK,
    target="/nix/store/abc-home-manager-files/web.service",
    resolved="/nix/store/def-web.service",
    uid=1001,
    mode=0o444,
    size=120,
    sha256="ab" * 32,
    mtime_ns=1_700_000_000_000_000_000,
    inode=42,
)


def _through(value: Any) -> Any:
    """A value as the other side sees it: encoded, framed, unframed, decoded as JSON."""
    frame = wire.encode_frame({"v": wire.to_wire(value)}, wire.REPLY_MAX)
    length = wire.frame_length(frame[: wire.HEADER.size], wire.REPLY_MAX)
    assert length == len(frame) - wire.HEADER.size
    return wire.decode_body(frame[wire.HEADER.size :])["v"]


class TestRoundTrip:
    """What the helper sends arrives as the same model value."""

    def test_file_fact(self) -> None:
        """Every field of a fact, enum included, survives the wire."""
        assert wire.from_wire(FileFact, _through(FACT)) == FACT

    def test_undecodable_path_bytes(self) -> None:
        """A path that is not UTF-8 arrives as the same bytes."""
        path = os.fsdecode(b"/home/u/\xffbad.service")
        fact = FileFact(path, FileKind.MISSING, error="No such file")
        back = wire.from_wire(FileFact, _through(fact))
        assert os.fsencode(back.path) == b"/home/u/\xffbad.service"

    def test_generation_with_links(self) -> None:
        """A generation's mapping of links and its tuple of dirs come back frozen and equal."""
        link = ExpectedLink("/h/a.service", "/s/hf/a.service", "/s/x-a.service", "cd" * 32)
        gen = HomeManagerGeneration("/s/gen", "/s/hf", frozen_map({link.path: link}), ("/h",))
        back = wire.from_wire(HomeManagerGeneration, _through(gen))
        assert back == gen
        assert back.links[link.path] == link

    def test_finding_and_unit_dirs(self) -> None:
        """Literal severities and tiers decode; a tuple of dataclasses decodes element-wise."""
        finding = Finding(FindingKind.LINK_REPLACED, "web.service", "/h/w", "critical", "x", 1.5)
        assert wire.from_wire(Finding, _through(finding)) == finding
        dirs = (UnitDir("/h/.config/systemd/user", Tier.CONFIG, 3),)
        assert wire.from_wire(tuple[UnitDir, ...], _through(dirs)) == dirs

    def test_optional_absent(self) -> None:
        """JSON null is None for an optional value."""
        assert wire.optional_from_wire(FileFact, None) is None


class TestHostileValues:
    """A reply of the wrong shape is refused with the field named, never half-accepted."""

    @pytest.mark.parametrize(
        ("change", "where"),
        [
            ({"uid": True}, "fact.uid"),
            ({"uid": "0"}, "fact.uid"),
            ({"kind": "socket"}, "fact.kind"),
            ({"sha256": 5}, "fact.sha256"),
            ({"path": None}, "fact.path"),
            ({"mode": 1.5}, "fact.mode"),
            ({"extra": 1}, "unknown fields"),
        ],
    )
    def test_wrong_field(self, change: dict[str, Any], where: str) -> None:
        """Wrong types, unknown enum values and unknown fields are each an error."""
        data = {**wire.to_wire(FACT), **change}
        with pytest.raises(wire.WireError, match=where.replace(".", r"\.")):
            wire.from_wire(FileFact, data, "fact")

    def test_missing_field(self) -> None:
        """A fact without its kind is refused."""
        data = wire.to_wire(FACT)
        del data["kind"]
        with pytest.raises(wire.WireError, match="kind"):
            wire.from_wire(FileFact, data, "fact")

    @pytest.mark.parametrize("data", [None, "x", {"a": 1}, [1, "x"]])
    def test_not_a_list_of_strings(self, data: Any) -> None:
        """A tuple of strings must be a JSON list of strings."""
        with pytest.raises(wire.WireError):
            wire.from_wire(tuple[str, ...], data)

    def test_not_an_object(self) -> None:
        """A dataclass must come as a JSON object."""
        with pytest.raises(wire.WireError, match="expected an object"):
            wire.from_wire(FileFact, [1, 2])


class TestFrames:
    """Frames are bounded on both sides, and the length is checked before the body is read."""

    def test_encoding_past_the_limit_is_refused(self) -> None:
        """A message larger than the limit is never framed."""
        with pytest.raises(wire.WireError, match="exceeds"):
            wire.encode_frame({"paths": ["x" * 100]}, 64)

    def test_announced_length_past_the_limit_is_refused(self) -> None:
        """A header announcing 4 GiB is refused from its 4 bytes alone."""
        with pytest.raises(wire.WireError, match="announced"):
            wire.frame_length(b"\xff\xff\xff\xff", wire.REPLY_MAX)

    def test_frames_are_ascii(self) -> None:
        """Non-ASCII text is escaped, so a body is always 7-bit JSON."""
        frame = wire.encode_frame({"p": "/home/zoë"}, 1024)
        assert frame[wire.HEADER.size :].isascii()
        assert wire.decode_body(frame[wire.HEADER.size :]) == {"p": "/home/zoë"}

    @pytest.mark.parametrize(
        "body", [b"not json", b"[1, 2]", '{"a": "\u00e9"}'.encode(), b"[" * 100_000]
    )
    def test_bad_bodies(self, body: bytes) -> None:
        """Non-JSON, non-objects, non-ASCII bytes and absurd nesting are protocol errors."""
        with pytest.raises(wire.WireError):
            wire.decode_body(body)

    def test_a_body_is_plain_json(self) -> None:
        """The body is standard JSON any tool can read: no pickle, no class names."""
        frame = wire.encode_frame({"facts": [wire.to_wire(FACT)]}, wire.REPLY_MAX)
        data = json.loads(frame[wire.HEADER.size :])
        assert data["facts"][0]["kind"] == "symlink"
