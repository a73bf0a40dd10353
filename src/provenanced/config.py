"""Settings: a TOML file plus ``PROVENANCED_*`` environment, validated once at the edge."""

from __future__ import annotations

import json
import os
import posixpath
import stat
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeGuard, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from provenanced.errors import ConfigError, one_line
from provenanced.expect.packages import PackageManager
from provenanced.model import FindingKind

HEALABLE = frozenset(
    {
        FindingKind.LINK_REPLACED,
        FindingKind.LINK_RETARGETED,
        FindingKind.LINK_DANGLING,
        FindingKind.MANAGED_MISSING,
    }
)
ENV_PREFIX = "PROVENANCED_"
# The example config is 3 KiB; anything near this is not a config file (or is /dev/zero).
MAX_CONFIG_BYTES = 1 << 20
# A key or message quoted in an error is cut after this many characters.
_SHOWN_MAX = 80


class _Section(BaseModel):
    # inf or nan would mean "never": a call that never times out, a backstop that never runs.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ManagerSettings(_Section):
    """How to reach the user manager."""

    bus_address: str | None = Field(
        None, description="D-Bus address of the manager; unset: private socket, then the user bus"
    )
    call_timeout: float = Field(10.0, gt=0, description="Seconds before a D-Bus call is abandoned")
    max_in_flight: int = Field(
        64, ge=1, le=128, description="D-Bus calls in flight at once on one connection"
    )
    reconnect_max_delay: float = Field(
        30.0, gt=0, description="Cap of the reconnect backoff, seconds"
    )


class ProvenanceSettings(_Section):
    """What vouches for unit files."""

    managed_roots: tuple[str, ...] = Field(
        ("/nix/store",), description="Symlinks resolving inside these directories are managed"
    )
    home_manager: bool = Field(True, description="Read the current Home Manager generation's links")
    packages: PackageManager = Field(
        "auto",
        description="Package database vouching for the vendor tier: auto (dpkg when present), "
        "dpkg, or none (the vendor tier is trusted as shipped)",
    )
    package_root: str = Field(
        "/", description="Root the package database describes (dpkg --root); / except for chroots"
    )

    @field_validator("managed_roots")
    @classmethod
    def _absolute(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not posixpath.isabs(root):
                raise ValueError(f"managed root {root!r} is not an absolute path")
        return tuple(posixpath.normpath(r) for r in roots)

    @field_validator("package_root")
    @classmethod
    def _absolute_root(cls, root: str) -> str:
        if not posixpath.isabs(root):
            raise ValueError(f"package root {root!r} is not an absolute path")
        return posixpath.normpath(root)


HealMode = Literal["flag", "heal"]


class PolicySettings(_Section):
    """What the daemon does about drift."""

    need_daemon_reload: Literal["reload", "flag", "ignore"] = Field(
        "reload",
        description="On stale definitions: reload the manager, only flag them, or ignore them",
    )
    quiet_window: float = Field(
        2.0, ge=0, description="Seconds without changes before acting on them"
    )
    defer_while_active: tuple[str, ...] = Field(
        ("home-manager-*.service",), description="Defer reloads while a matching unit is activating"
    )
    max_reloads_per_hour: int = Field(12, ge=0, description="Upper bound on automatic reloads")
    activation_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds a Home Manager activation may hold findings, reloads and heals back",
    )
    heal: dict[FindingKind, HealMode] = Field(
        default_factory=dict, description="Per drift kind: flag (default) or heal (link kinds only)"
    )
    resync_interval: float = Field(900.0, gt=0, description="Seconds between backstop full resyncs")
    degraded_resync_interval: float = Field(
        60.0, gt=0, description="Seconds between full resyncs when inotify watches are exhausted"
    )
    alert_min_interval: float = Field(
        60.0, ge=0, description="Minimum seconds between two alerts for the same finding"
    )

    @field_validator("heal")
    @classmethod
    def _healable(cls, heal: dict[FindingKind, HealMode]) -> dict[FindingKind, HealMode]:
        for kind, mode in heal.items():
            if mode == "heal" and kind not in HEALABLE:
                allowed = ", ".join(sorted(k.value for k in HEALABLE))
                raise ValueError(f"{kind.value} cannot be healed (only {allowed})")
        return heal


class TlsSettings(_Section):
    """TLS for the HTTP endpoint; both cert and key, optionally a client CA for mTLS."""

    cert_file: Path | None = Field(None, description="PEM certificate; enables HTTPS with key_file")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    client_ca_file: Path | None = Field(
        None, description="PEM CA; when set, clients must present a cert"
    )


class MetricsSettings(_Section):
    """The HTTP endpoint: metrics, health, findings."""

    listen: str = Field(
        "127.0.0.1:10055", description="host:port to listen on ([::1]:port for IPv6)"
    )
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str) -> str:
        host, sep, port = listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{listen!r} is not host:port")
        return listen


class LogSettings(_Section):
    """Logging."""

    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Minimum level")
    format: Literal["auto", "console", "logfmt", "json", "journal"] = Field(
        "auto", description="auto: console on a tty, journal fields under systemd, logfmt otherwise"
    )


class HostSettings(_Section):
    """Host mode: one daemon as root following every user manager on the machine."""

    runtime_root: str = Field(
        "/run/user", description="Where the user runtime dirs are (<runtime_root>/<uid>)"
    )
    state_root: str = Field(
        "/var/lib/provenanced", description="Per-user state under <state_root>/<user>, mode 0700"
    )
    allow_users: tuple[str, ...] = Field((), description="Only these users (empty: every user)")
    deny_users: tuple[str, ...] = Field((), description="Never these users")

    @field_validator("runtime_root", "state_root")
    @classmethod
    def _absolute_dir(cls, path: str) -> str:
        if not posixpath.isabs(path):
            raise ValueError(f"{path!r} is not an absolute path")
        return posixpath.normpath(path)

    def follows(self, user: str) -> bool:
        """Whether the allow and deny lists let the daemon follow ``user``."""
        allowed = not self.allow_users or user in self.allow_users
        return allowed and user not in self.deny_users


class Settings(BaseSettings):
    """The effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        allow_inf_nan=False,
    )

    state_dir: Path | None = Field(
        None, description="Baseline and quarantine; default $XDG_STATE_HOME/provenanced"
    )
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    provenance: ProvenanceSettings = Field(default_factory=ProvenanceSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    scope: Literal["user", "host"] = Field(
        "user", description="user: follow the own user manager; host: every user's (as root)"
    )
    host: HostSettings = Field(default_factory=HostSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init values; the environment overrides it.
        return (env_settings, init_settings)

    def resolved_state_dir(self, env: Mapping[str, str]) -> str:
        """The state directory, following the XDG base directory rules when unset."""
        if self.state_dir is not None:
            return str(self.state_dir)
        state_home = env.get("XDG_STATE_HOME") or posixpath.join(
            env.get("HOME", "~"), ".local/state"
        )
        return posixpath.join(state_home, "provenanced")


class _PolicyFile(_Section):
    """A user's own policy file in host mode: a ``[policy]`` table and nothing else."""

    policy: PolicySettings = Field(default_factory=PolicySettings)


def validate_policy_file(data: Mapping[str, Any], source: str) -> PolicySettings:
    """The file's ``[policy]`` table, validated; ``model_fields_set`` names the keys it sets."""
    try:
        return _PolicyFile.model_validate(data).policy
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc


SYSTEM_CONFIG_PATH = Path("/etc/provenanced/config.toml")


def default_config_path(env: Mapping[str, str], host: bool = False) -> Path:
    """``$XDG_CONFIG_HOME/provenanced/config.toml``; in host mode the system config."""
    if host:
        return SYSTEM_CONFIG_PATH
    config_home = env.get("XDG_CONFIG_HOME") or posixpath.join(env.get("HOME", "~"), ".config")
    return Path(config_home, "provenanced", "config.toml")


def load_settings(
    path: Path | None = None, env: Mapping[str, str] | None = None, *, host: bool = False
) -> Settings:
    """Validate the TOML file (an explicit path must exist) plus the environment.

    ``host`` (``run --host``) reads the system config by default and sets ``scope = "host"``.
    """
    env = os.environ if env is None else env
    explicit = path is not None
    path = path if path is not None else default_config_path(env, host)
    data: dict[str, Any] = {}
    # Without a file, whatever is invalid came from the environment.
    source = "environment"
    try:
        data = read_toml_file(path)
        source = str(path)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
    if host:
        data["scope"] = "host"
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {validation_message(exc)}") from exc
    except (SettingsError, RecursionError) as exc:
        # pydantic-settings decodes list and table variables as JSON (from os.environ, whatever
        # ``env`` says) and its error names only the section: name the variable instead.
        raise ConfigError(f"environment: {_describe_bad_json(os.environ)}") from exc


def read_toml_file(path: Path) -> dict[str, Any]:
    """The TOML table in ``path``; FileNotFoundError passes, any other problem is a ConfigError."""
    try:
        return tomllib.loads(read_config_file(path).decode("utf-8"))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {' '.join(str(exc).split())}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{path}: invalid TOML: nested too deeply") from exc


def read_config_file(path: Path) -> bytes:
    """The bytes of a regular file of at most MAX_CONFIG_BYTES; never waits for a writer.

    Anything else (a FIFO, /dev/zero, a terminal) is refused before it is read: a FIFO would
    block until someone writes to it, a device may never end.
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ConfigError(f"config file {path} is not a regular file")
    # O_NONBLOCK: if the name was swapped for a FIFO since the stat, open must not wait either.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"config file {path} is not a regular file")
        chunks: list[bytes] = []
        size = 0
        # One byte past the cap is enough to know the file is too large.
        while size <= MAX_CONFIG_BYTES and (chunk := os.read(fd, MAX_CONFIG_BYTES + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes")
    return b"".join(chunks)


def _describe_bad_json(env: Mapping[str, str]) -> str:
    """Name the ``PROVENANCED_*`` list or table variables whose value is not JSON."""
    bad = []
    for name, value in sorted(env.items()):
        if not _is_json_variable(name):
            continue
        try:
            json.loads(value)
        except ValueError as exc:
            bad.append(f"{name}: invalid JSON ({one_line(str(exc), _SHOWN_MAX)})")
        except RecursionError:
            bad.append(f"{name}: invalid JSON (nested too deeply)")
    return "; ".join(bad) or "a PROVENANCED_* list or table value is not valid JSON"


def _is_json_variable(name: str) -> bool:
    """Whether pydantic-settings decodes ``name`` as JSON: it sets a section, a list or a table."""
    if not name.upper().startswith(ENV_PREFIX):
        return False
    model: type[BaseModel] = Settings
    *sections, key = name[len(ENV_PREFIX) :].lower().split("__")
    for section in sections:
        field = model.model_fields.get(section)
        if field is None or not _is_model(field.annotation):
            return False
        model = field.annotation
    field = model.model_fields.get(key)
    if field is None:
        return False
    return _is_model(field.annotation) or get_origin(field.annotation) in (tuple, list, dict)


def _is_model(annotation: object) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def validation_message(exc: ValidationError) -> str:
    """One readable clause per validation error, naming the key."""
    parts = []
    for error in exc.errors():
        key = ".".join(one_line(str(p), _SHOWN_MAX) for p in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{key}: {' '.join(message.split())}")
    return "; ".join(parts)
