"""Who listens on a port, from the kernel's /proc/net/tcp tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from provenanced.commands.portcheck import PortTakenError, check_port, listeners

# Two listeners (127.0.0.1:10055 of uid 1001, 0.0.0.0:22 of root) and one established connection.
TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2757 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 1 1
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:2757 0100007F:9C40 01 00000000:00000000 00:00000000 00000000  1002        0 3 1
"""


class TestListeners:
    def test_only_listening_sockets_with_their_port_and_uid(self) -> None:
        """The st column 0A is LISTEN; the port is the hex after the colon; uid is column 8."""
        assert list(listeners(TABLE)) == [(10071, 1001), (22, 0)]


class TestCheckPort:
    def test_another_users_listener_is_refused_naming_the_fixes(self, tmp_path: Path) -> None:
        """uid 1002 installing on uid 1001's port: one line naming metrics.listen and --host."""
        table = tmp_path / "tcp"
        table.write_text(TABLE)
        with pytest.raises(PortTakenError, match=r"uid 1001.*metrics\.listen.*run --host"):
            check_port("127.0.0.1:10071", 1002, [str(table)])

    def test_a_users_daemon_on_the_host_port_names_uninstall(self, tmp_path: Path) -> None:
        """install --host over a user's own daemon: uninstall it as that user, or --listen."""
        table = tmp_path / "tcp"
        table.write_text(TABLE)
        with pytest.raises(PortTakenError, match=r"uid 1001.*provenanced uninstall.*--listen"):
            check_port("127.0.0.1:10071", 0, [str(table)], host=True)
        check_port("127.0.0.1:22", 0, [str(table)], host=True)  # root's own listener

    def test_own_listener_or_free_port_is_fine(self, tmp_path: Path) -> None:
        """A reinstall over one's own running daemon, or a free port, passes."""
        table = tmp_path / "tcp"
        table.write_text(TABLE)
        check_port("127.0.0.1:10071", 1001, [str(table)])
        check_port("127.0.0.1:10072", 1002, [str(table), str(tmp_path / "absent")])
