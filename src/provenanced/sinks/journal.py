"""journald alerts: one structured entry per finding transition, reload, heal, lost connection.

Field values go out verbatim: ``sd_journal_sendv`` switches any value holding a newline to its
binary-safe framing (name, newline, 64-bit length, bytes), so a unit name or path cannot inject
a field; only MESSAGE is escaped, so a human reading ``journalctl`` sees no fake lines.

``USER_UNIT`` makes an entry show up in ``journalctl --user-unit UNIT`` run by the uid that sent
it: journalctl matches ``USER_UNIT=UNIT`` (or ``_SYSTEMD_USER_UNIT``) together with ``_UID=`` its
own uid, and journald sets ``_UID`` from the sender's socket credentials. root, reading another
user's entries, needs ``journalctl _UID=<uid> USER_UNIT=<unit>``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Final, Literal

from systemd import journal

from provenanced.model import Finding, Severity, Transition

DRIFT_DETECTED: Final = "602394dfbeaf4f2796fcbdeea0b459bf"
DRIFT_RESOLVED: Final = "c6977927e6464702ae1d8e2ade0a959d"
RELOAD_DONE: Final = "cf85ee367c544dee94d1a3aa33c960ff"
RELOAD_FAILED: Final = "6153be55706e4a3cac3a71b05c65605b"
HEAL_DONE: Final = "3d3d5a40837b4276a98606ac445c2d47"
HEAL_FAILED: Final = "b67c8abdd2454fe8a4d2e88be2a143f0"
JOB_UNVERIFIED: Final = "0b9945bf71634ea286075da53bc2d499"
CONNECTION_LOST: Final = "b5b3468fbee347e6af9e7756e7db3884"

JOURNAL_SOCKET: Final = "/run/systemd/journal/socket"  # fixed in libsystemd's sender
SYSLOG_IDENTIFIER: Final = "provenanced"
SINK_NAME: Final = "journal"
# syslog priorities: 2 crit, 3 err, 4 warning, 5 notice, 6 info.
PRIORITY_BY_SEVERITY: Final[dict[Severity, int]] = {"critical": 2, "warning": 4, "info": 6}
_ERR: Final = 3
_NOTICE: Final = 5
_INFO: Final = 6

AlertResult = Literal["ok", "error"]
OnResult = Callable[[str, AlertResult], None]
Entry = dict[str, str]


class JournalSink:
    """Sends alert entries to journald; never raises, and reports each outcome to ``on_result``.

    When journald is unreachable (socket missing, or nobody listening on it) the entry is
    written as one JSON line on stderr instead. The send is synchronous, like any
    ``sd_journal_send``: journald drains its socket quickly, but an engine that must never wait
    on it can call these methods through ``asyncio.to_thread``.
    ``on_result(sink, result)`` has the shape of ``Telemetry.record_alert``.
    """

    def __init__(
        self, on_result: OnResult | None = None, user: tuple[str, int] | None = None
    ) -> None:
        self._on_result = on_result
        # Host mode: (name, uid) of the user whose manager the entries are about.
        self._user = user

    def send_transition(self, t: Transition) -> None:
        """A finding opened or closed."""
        self._emit(transition_entry(t))

    def send_reload(self, ok: bool, trigger: str, detail: str) -> None:
        """A daemon-reload of the user manager finished."""
        self._emit(reload_entry(ok, trigger, detail))

    def send_heal(self, ok: bool, finding: Finding, detail: str) -> None:
        """An attempt to restore a drifted file finished."""
        self._emit(heal_entry(ok, finding, detail))

    def send_job_unverified(self, f: Finding) -> None:
        """A job ended ``done`` but its unit did not verify."""
        self._emit(job_unverified_entry(f))

    def send_connection_lost(self, address: str, error: str) -> None:
        """The connection to the user manager dropped."""
        self._emit(connection_lost_entry(address, error))

    def _emit(self, entry: Entry) -> None:
        if self._user is not None:
            entry = {**entry, **user_fields(entry, *self._user)}
        try:
            # sd_journal_sendv reports success when the socket is missing (it "fails silently"
            # on ENOENT), so look for it first; a stale socket still raises ECONNREFUSED below.
            os.stat(JOURNAL_SOCKET)
            journal.sendv(*(_line(name, value) for name, value in entry.items()))
        except (OSError, ValueError) as exc:
            _write_fallback(entry, exc)
            self._report("error")
        else:
            self._report("ok")

    def _report(self, result: AlertResult) -> None:
        if self._on_result is not None:
            self._on_result(SINK_NAME, result)


def user_fields(entry: Entry, name: str, uid: int) -> Entry:
    """Host mode's fields: the user, and what makes their ``journalctl --user-unit`` find it.

    journalctl matches ``OBJECT_SYSTEMD_USER_UNIT`` together with ``_UID=0`` (systemd
    ``src/shared/logs-show.c``, ``add_matches_for_user_unit()``); docs/host-mode.md.
    """
    fields = {"PROVENANCED_USER": name, "OBJECT_UID": str(uid)}
    if "USER_UNIT" in entry:
        fields["OBJECT_SYSTEMD_USER_UNIT"] = entry["USER_UNIT"]
    return fields


def transition_entry(t: Transition) -> Entry:
    """The entry for a finding that was detected or resolved."""
    f = t.finding
    if t.state == "detected":
        text = f"drift detected: {f.kind.value} in {f.unit}: {f.path} ({f.detail})"
        return _finding_entry(DRIFT_DETECTED, PRIORITY_BY_SEVERITY[f.severity], text, f, f.detail)
    text = f"drift resolved: {f.kind.value} in {f.unit}: {f.path}"
    return _finding_entry(DRIFT_RESOLVED, _NOTICE, text, f, f.detail)


def reload_entry(ok: bool, trigger: str, detail: str) -> Entry:
    """The entry for a finished daemon-reload."""
    outcome = "done" if ok else f"failed: {detail}"
    return {
        "MESSAGE": _printable(f"daemon-reload of the user manager {outcome} (trigger: {trigger})"),
        "MESSAGE_ID": RELOAD_DONE if ok else RELOAD_FAILED,
        "PRIORITY": str(_INFO if ok else _ERR),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "PROVENANCED_TRIGGER": trigger,
        "PROVENANCED_DETAIL": detail,
    }


def heal_entry(ok: bool, finding: Finding, detail: str) -> Entry:
    """The entry for a finished heal attempt."""
    f = finding
    if ok:
        text = f"healed {f.kind.value} in {f.unit}: {f.path} ({detail})"
        return _finding_entry(HEAL_DONE, _NOTICE, text, f, detail)
    text = f"heal failed for {f.kind.value} in {f.unit}: {f.path}: {detail}"
    return _finding_entry(HEAL_FAILED, _ERR, text, f, detail)


def job_unverified_entry(f: Finding) -> Entry:
    """The entry for a job that ended done while its unit did not verify."""
    text = f"job for {f.unit} ended done but the unit did not verify: {f.detail}"
    return _finding_entry(JOB_UNVERIFIED, PRIORITY_BY_SEVERITY[f.severity], text, f, f.detail)


def connection_lost_entry(address: str, error: str) -> Entry:
    """The entry for a dropped manager connection."""
    return {
        "MESSAGE": _printable(f"lost the connection to the user manager at {address}: {error}"),
        "MESSAGE_ID": CONNECTION_LOST,
        "PRIORITY": str(_ERR),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "PROVENANCED_ADDRESS": address,
        "PROVENANCED_DETAIL": error,
    }


def _finding_entry(message_id: str, priority: int, text: str, f: Finding, detail: str) -> Entry:
    return {
        "MESSAGE": _printable(text),
        "MESSAGE_ID": message_id,
        "PRIORITY": str(priority),
        "SYSLOG_IDENTIFIER": SYSLOG_IDENTIFIER,
        "USER_UNIT": f.unit,
        "PROVENANCED_KIND": f.kind.value,
        "PROVENANCED_PATH": f.path,
        "PROVENANCED_SEVERITY": f.severity,
        "PROVENANCED_DETAIL": detail,
    }


def _printable(text: str) -> str:
    """Escape control and unprintable characters so MESSAGE stays one honest line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _line(name: str, value: str) -> bytes:
    """``NAME=value`` as bytes; undecodable path bytes (surrogate escapes) go out as they were."""
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "backslashreplace")
    return name.encode("ascii") + b"=" + raw


def _write_fallback(entry: Entry, exc: Exception) -> None:
    """One JSON line on stderr, so the alert is not lost when journald is unreachable."""
    record = {"event": "journal.send_failed", "error": str(exc), "entry": entry}
    try:
        sys.stderr.write(json.dumps(record, ensure_ascii=True) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # stderr is gone too; on_result still counts the failure
