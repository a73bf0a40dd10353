"""Whether the port a user-mode install will listen on is already another user's.

Every user's daemon binds ``127.0.0.1:10055`` by default, so on a shared host the second user's
service cannot start. The kernel names the owner of each listening TCP socket in
``/proc/net/tcp`` and ``/proc/net/tcp6`` (the ``uid`` column), so install can say so, and how to
fix it, before it writes anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from provenanced.errors import ProvenancedError
from provenanced.sinks.http import parse_listen

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"  # TCP_LISTEN in the st column


class PortTakenError(ProvenancedError):
    """Another uid listens on the port the installed daemon would bind."""

    exit_code = 2


def listeners(table: str) -> Iterable[tuple[int, int]]:
    """(port, uid) of every listening socket in the text of a /proc/net/tcp{,6} table."""
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8 or fields[3] != _LISTEN:
            continue
        _address, _, port = fields[1].rpartition(":")
        yield int(port, 16), int(fields[7])


def check_port(
    listen: str, uid: int, tables: Iterable[str] = PROC_TABLES, *, host: bool = False
) -> None:
    """Raise PortTakenError, naming the fix, when a uid other than ``uid`` listens on the port.

    ``host``: the host-mode daemon would bind it; the owner is most likely a user's own daemon.
    """
    _host, port = parse_listen(listen)
    for path in tables:
        try:
            with open(path, encoding="ascii") as table:
                text = table.read()
        except OSError:
            continue
        owners = sorted({owner for p, owner in listeners(text) if p == port and owner != uid})
        if owners and host:
            raise PortTakenError(
                f"port {port} ({listen}) is already taken by uid {owners[0]}, probably that "
                f"user's own provenanced: run `provenanced uninstall` as that user (host mode "
                f"follows their manager), or install with --listen HOST:PORT"
            )
        if owners:
            raise PortTakenError(
                f"port {port} ({listen}) is already taken by uid {owners[0]}, probably another "
                f"user's provenanced: set metrics.listen (PROVENANCED_METRICS__LISTEN) to a free "
                f"port, or run one daemon for every user (provenanced run --host)"
            )
