"""The fault suite injects faults only root may: mounts, sysctls, capabilities, namespaces."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    """Without root these tests cannot inject their faults; in CI that is a failure, not a skip."""
    if os.geteuid() == 0:
        return
    message = "the fault suite injects faults as root (mount, unshare, setpriv, SIGSTOP)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message)
    pytest.skip(message)
