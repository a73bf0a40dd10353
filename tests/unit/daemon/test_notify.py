"""sd_notify never takes the daemon down."""

from __future__ import annotations

from pathlib import Path

import pytest

from provenanced.daemon import notify


def test_a_notify_socket_that_went_away_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGHUP or a stop after the notify socket vanished must not raise out of the daemon."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert notify.notify("STATUS=x") is False
    notify.reloading()
    notify.stopping()
