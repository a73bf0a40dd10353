"""Parsing the HTTP listen address."""

from __future__ import annotations

import pytest

from provenanced.errors import ConfigError
from provenanced.sinks.http import DEFAULT_LISTEN, parse_listen


class TestParseListen:
    @pytest.mark.parametrize(
        ("listen", "expected"),
        [
            (DEFAULT_LISTEN, ("127.0.0.1", 10055)),
            ("localhost:0", ("localhost", 0)),
            ("0.0.0.0:9000", ("0.0.0.0", 9000)),
            ("[::1]:10055", ("::1", 10055)),
            ("[::]:65535", ("::", 65535)),
        ],
    )
    def test_valid(self, listen: str, expected: tuple[str, int]) -> None:
        """host:port and [v6]:port split into host and integer port."""
        assert parse_listen(listen) == expected

    @pytest.mark.parametrize(
        "listen",
        ["", "10055", ":10055", "127.0.0.1", "127.0.0.1:", "host:http", "host:70000", "::1:10055"],
    )
    def test_invalid(self, listen: str) -> None:
        """Anything else is a ConfigError with one line naming the value."""
        with pytest.raises(ConfigError) as info:
            parse_listen(listen)
        assert "\n" not in str(info.value)
        assert repr(listen) in str(info.value)
