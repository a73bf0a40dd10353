"""Settings: a TOML file plus ``PROVENANCED_*`` environment, validated once at the edge."""

from __future__ import annotations

import os
import posixpath
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from provenanced.errors import ConfigError
from provenanced.model import FindingKind

HEALABLE = frozenset(
    {
        FindingKind.LINK_REPLACED,
        FindingKind.LINK_RETARGETED,
        FindingKind.LINK_DANGLING,
        FindingKind.MANAGED_MISSING,
    }
)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ManagerSettings(_Section):
    """How to reach the user manager."""

    bus_address: str | None = Field(
        None, description="D-Bus address of the manager; unset: private socket, then the user bus"
    )
    call_timeout: float = Field(10.0, gt=0, description="Seconds before a D-Bus call is abandoned")
    max_in_flight: int = Field(
        32, ge=1, le=128, description="D-Bus calls in flight at once on one connection"
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

    @field_validator("managed_roots")
    @classmethod
    def _absolute(cls, roots: tuple[str, ...]) -> tuple[str, ...]:
        for root in roots:
            if not posixpath.isabs(root):
                raise ValueError(f"managed root {root!r} is not an absolute path")
        return tuple(posixpath.normpath(r) for r in roots)


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


class Settings(BaseSettings):
    """The effective configuration."""

    model_config = SettingsConfigDict(
        env_prefix="PROVENANCED_", env_nested_delimiter="__", extra="forbid", frozen=True
    )

    state_dir: Path | None = Field(
        None, description="Baseline and quarantine; default $XDG_STATE_HOME/provenanced"
    )
    manager: ManagerSettings = Field(default_factory=ManagerSettings)
    provenance: ProvenanceSettings = Field(default_factory=ProvenanceSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    log: LogSettings = Field(default_factory=LogSettings)

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


def default_config_path(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/provenanced/config.toml``."""
    config_home = env.get("XDG_CONFIG_HOME") or posixpath.join(env.get("HOME", "~"), ".config")
    return Path(config_home, "provenanced", "config.toml")


def load_settings(path: Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Validate the TOML file (an explicit path must exist) plus the environment."""
    env = os.environ if env is None else env
    explicit = path is not None
    path = path if path is not None else default_config_path(env)
    data: dict[str, Any] = {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {' '.join(str(exc).split())}") from exc
    try:
        return Settings(**data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_errors(exc)}") from exc


def describe_errors(exc: ValidationError) -> str:
    """One readable clause per validation error, naming the key."""
    parts = []
    for error in exc.errors():
        key = ".".join(str(p) for p in error["loc"]) or "(root)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        parts.append(f"{key}: {' '.join(message.split())}")
    return "; ".join(parts)
