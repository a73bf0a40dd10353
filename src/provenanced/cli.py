"""The ``provenanced`` command line: the only place that prints errors and picks exit codes."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from provenanced import __version__
from provenanced.config import Settings, load_settings
from provenanced.core.audit import audit
from provenanced.core.provenance import provenance_of
from provenanced.core.vouching import expectations
from provenanced.daemon.observer import Observer, baseline_facts, matches, user_dirs
from provenanced.errors import ProvenancedError, UsageError, one_line
from provenanced.expect import baseline
from provenanced.expect.packages import open_database
from provenanced.logging import configure_logging
from provenanced.model import Finding
from provenanced.systemd.bus import ManagerConnection, resolve_address
from provenanced.systemd.names import UNIT_NAME_MAX, is_template, is_valid_unit_name

EXIT_OK, EXIT_FINDINGS = 0, 1
# A unit name quoted in an error is cut after this many characters.
_NAME_SHOWN = 60


def _settings(args: argparse.Namespace, *, host: bool = False) -> Settings:
    settings = load_settings(args.config, host=host)
    # Logs go to stderr at the configured level: stdout carries only the command's answer.
    configure_logging(settings.log.level, settings.log.format)
    return settings


def _check_unit_names(names: Sequence[str]) -> None:
    """Refuse, before any bus call, a name the manager would refuse to load."""
    for name in names:
        if is_template(name) and is_valid_unit_name(name):
            stem, _, suffix = name.rpartition(".")
            raise UsageError(f"{name} is a template; name an instance, such as {stem}NAME.{suffix}")
        if len(name) > UNIT_NAME_MAX:
            shown = one_line(name, _NAME_SHOWN)
            raise UsageError(f"{shown} is not a unit name: longer than {UNIT_NAME_MAX} characters")
        if not is_valid_unit_name(name):
            raise UsageError(f"{one_line(name, _NAME_SHOWN)} is not a valid unit name")


async def _connect(settings: Settings, address: str | None = None) -> ManagerConnection:
    """The user manager the settings name, or the manager at ``address``."""
    transport = resolve_address(address or settings.manager.bus_address, os.environ)
    return await ManagerConnection.connect(
        transport,
        timeout=settings.manager.call_timeout,
        max_in_flight=settings.manager.max_in_flight,
    )


def _observer(settings: Settings, conn: ManagerConnection) -> Observer:
    provenance = settings.provenance
    return Observer(
        conn,
        user_dirs(os.environ),
        provenance.managed_roots,
        read_home_manager=provenance.home_manager,
        packages=open_database(provenance.packages, provenance.package_root),
        system_root=provenance.package_root,
    )


def _run(coro: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coro)


def _print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths, strict=True)]
        print("  ".join([*cells, str(row[-1])]))


async def _audit(args: argparse.Namespace) -> int:
    settings = _settings(args)
    started = time.monotonic()
    conn = await _connect(settings)
    try:
        observer = _observer(settings, conn)
        obs, generation = await observer.observe()
    finally:
        await conn.close()
    state_dir = settings.resolved_state_dir(os.environ)
    accepted = baseline.load_baseline(state_dir)
    if accepted is None:
        # First use: what is there now is what the user accepts, so later changes stand out.
        accepted = baseline.entries_from_facts(baseline_facts(obs))
        path = baseline.save_baseline(state_dir, accepted)
        print(
            f"provenanced: recorded a first baseline of {len(accepted)} files in {path}",
            file=sys.stderr,
        )
    exp = expectations(
        settings.provenance.managed_roots, generation, accepted, observer.package_index
    )
    findings = [f for f in audit(obs, exp) if matches(f.unit, args.patterns)]
    units = sum(1 for name in obs.units if matches(name, args.patterns))
    duration = time.monotonic() - started
    if args.json:
        document = {
            "units": units,
            "findings": [f.to_json() for f in findings],
            "duration_seconds": duration,
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        _print_findings(findings, units, duration)
    return EXIT_FINDINGS if findings else EXIT_OK


def _print_findings(findings: Sequence[Finding], units: int, duration: float) -> None:
    if findings:
        rows = [(f.unit, f.kind.value, f.severity, f.path, f.detail) for f in findings]
        _print_table(rows, ("UNIT", "KIND", "SEVERITY", "PATH", "DETAIL"))
        print()
    print(f"{len(findings)} findings in {units} units ({duration:.2f} s)")


async def _show(args: argparse.Namespace) -> int:
    _check_unit_names(args.units)
    settings = _settings(args)
    conn = await _connect(settings)
    try:
        observer = _observer(settings, conn)
        obs, generation = await observer.observe(patterns=args.units, load=args.units)
    finally:
        await conn.close()
    accepted = baseline.load_baseline(settings.resolved_state_dir(os.environ))
    exp = expectations(
        settings.provenance.managed_roots, generation, accepted or {}, observer.package_index
    )
    shown = [provenance_of(obs.units[name], obs, exp) for name in args.units if name in obs.units]
    if args.json:
        print(json.dumps([u.to_json() for u in shown], indent=2, ensure_ascii=False))
        return EXIT_OK
    for index, unit in enumerate(shown):
        if index:
            print()
        reload = "yes" if unit.need_daemon_reload else "no"
        print(f"{unit.unit}  LoadState={unit.load_state}  NeedDaemonReload={reload}")
        rows = [
            (
                role,
                f.tier,
                f.kind,
                f.owner_label,
                (f.sha256 or "-")[:12],
                f.path + (f" -> {f.target}" if f.target else ""),
            )
            for role, f in [
                ("fragment", unit.fragment),
                *[("drop-in", d) for d in unit.dropins],
                ("source", unit.source),
            ]
            if f is not None
        ]
        if rows:
            _print_table(rows, ("ROLE", "TIER", "KIND", "OWNER", "SHA256", "PATH"))
        else:
            print("  (no fragment, no drop-ins)")
    return EXIT_OK


async def _baseline_accept(args: argparse.Namespace) -> int:
    settings = _settings(args)
    conn = await _connect(settings)
    try:
        obs, _ = await _observer(settings, conn).observe()
    finally:
        await conn.close()
    entries = baseline.entries_from_facts(baseline_facts(obs))
    path = baseline.save_baseline(settings.resolved_state_dir(os.environ), entries)
    print(f"accepted {len(entries)} files as the baseline in {path}")
    return EXIT_OK


def _run_daemon(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, host=args.host)
    configure_logging(settings.log.level, settings.log.format)
    if settings.scope == "host":
        from provenanced.daemon.host import serve_host

        # A reload reads the configuration as start-up did (--host or scope = "host").
        reread = partial(load_settings, args.config, host=args.host)
        asyncio.run(serve_host(settings, args.config, reread))
        return EXIT_OK
    from provenanced.daemon.service import serve

    asyncio.run(serve(settings, args.config))
    return EXIT_OK


async def _restart(args: argparse.Namespace) -> int:
    from provenanced.commands.restart import restart_and_verify

    if not args.verify:
        raise UsageError("restart needs --verify (plain restarts are systemctl's job)")
    # Checked before the restart: a timeout of 0, -1 or nan would restart, then report a timeout.
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise UsageError(f"--timeout must be a positive number of seconds, not {args.timeout:g}")
    _check_unit_names([args.unit])
    settings = _settings(args)
    conn = await _connect(settings)
    try:
        verdict = await restart_and_verify(conn, args.unit, args.timeout, os.environ)
    finally:
        await conn.close()
    print(verdict.reason, file=sys.stdout if verdict.verified else sys.stderr)
    return EXIT_OK if verdict.verified else EXIT_FINDINGS


def _check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(json.dumps(settings.model_dump(mode="json"), indent=2))
    return EXIT_OK


async def _install(args: argparse.Namespace) -> int:
    from provenanced.commands.install import (
        SYSTEM_MANAGER_ADDRESS,
        install,
        install_host,
        socket_listen,
    )

    if args.listen is not None:
        _check_listen(args.listen)
    if args.host and args.socket:
        raise UsageError("--socket is for the user service; the host service listens itself")
    settings = _settings(args, host=args.host)
    conn = await _connect(settings, SYSTEM_MANAGER_ADDRESS if args.host else None)
    try:
        if args.host:
            outcome = await install_host(
                conn, now=args.now, listen=args.listen, configured_listen=settings.metrics.listen
            )
        else:
            outcome = await install(
                conn,
                os.environ,
                socket=args.socket,
                now=args.now,
                state_dir=settings.resolved_state_dir(os.environ),
                listen=args.listen,
                # The socket unit listens on its own (packaged) address.
                configured_listen=socket_listen() if args.socket else settings.metrics.listen,
            )
    finally:
        await conn.close()
    print("\n".join(outcome.lines))
    return EXIT_OK if outcome.ok else EXIT_FINDINGS


def _check_listen(listen: str) -> None:
    from provenanced.sinks.http import parse_listen

    try:
        parse_listen(listen)
    except ProvenancedError as exc:
        raise UsageError(f"--listen: {exc}") from None


async def _uninstall(args: argparse.Namespace) -> int:
    from provenanced.commands.install import SYSTEM_MANAGER_ADDRESS, uninstall, uninstall_host

    settings = _settings(args, host=args.host)
    conn = await _connect(settings, SYSTEM_MANAGER_ADDRESS if args.host else None)
    try:
        outcome = await (uninstall_host(conn) if args.host else uninstall(conn, os.environ))
    finally:
        await conn.close()
    print("\n".join(outcome.lines))
    return EXIT_OK if outcome.ok else EXIT_FINDINGS


def _demo(args: argparse.Namespace) -> int:
    from provenanced.commands.demo import run_demo

    return run_demo(scenario=args.scenario, listen=args.listen)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="provenanced",
        description="Know where every systemd user unit's definition comes from; say so when it drifts.",
    )
    parser.add_argument("--version", action="version", version=f"provenanced {__version__}")
    parser.add_argument(
        "--config", type=Path, help="TOML config (default $XDG_CONFIG_HOME/provenanced/config.toml)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = command("run", _run_daemon, "run the daemon in the foreground (as the user service does)")
    p.add_argument(
        "--host",
        action="store_true",
        help="as root, follow every user's manager (config default /etc/provenanced/config.toml)",
    )

    p = command("audit", lambda a: _run(_audit(a)), "audit every user unit once and list drift")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "patterns", nargs="*", metavar="PATTERN", help="only units matching these shell patterns"
    )

    p = command(
        "show", lambda a: _run(_show(a)), "show where each file of a unit's definition comes from"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("units", nargs="+", metavar="UNIT")

    p = command("baseline", lambda a: _run(_baseline_accept(a)), "manage the accepted baseline")
    p.add_argument(
        "action", choices=["accept"], help="accept: record the current files as vouched for"
    )

    p = command(
        "restart",
        lambda a: _run(_restart(a)),
        "restart a unit and verify it really ran and succeeded",
    )
    p.add_argument(
        "--verify", action="store_true", help="wait for the job and judge the result (required)"
    )
    p.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for the job and for settling"
    )
    p.add_argument("unit", metavar="UNIT")

    command("check-config", _check_config, "validate and print the effective configuration")

    p = command(
        "install", lambda a: _run(_install(a)), "install and enable the systemd user service"
    )
    p.add_argument("--socket", action="store_true", help="also socket-activate the HTTP port")
    p.add_argument("--now", action="store_true", help="start the units as well")
    p.add_argument(
        "--host",
        action="store_true",
        help="as root, the host-mode system service (provenanced-host.service) instead",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="the address the installed service listens on (overrides metrics.listen)",
    )

    p = command(
        "uninstall", lambda a: _run(_uninstall(a)), "stop, disable and remove what install wrote"
    )
    p.add_argument("--host", action="store_true", help="the host-mode system service")

    p = command(
        "demo", _demo, "boot a sandboxed user manager with a Home Manager tree and watch it"
    )
    p.add_argument(
        "--scenario", action="store_true", help="inject a sequence of real drifts on a timer"
    )
    p.add_argument("--listen", default="127.0.0.1:10055", help="metrics listen address (host:port)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become one stderr line and a documented exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except ProvenancedError as exc:
        print(f"provenanced: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
