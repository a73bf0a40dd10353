"""Heal and quarantine inside a user's helper, so every write happens with the user's rights.

Started as ``python -I -m provenanced.daemon.healasuser`` (``UserHelper.start(creds,
module=HEAL_HELPER)``), the helper serves the read operations plus ``heal``, which runs
``Healer.heal`` unchanged as the user: every file it creates belongs to the user, and a link the
user planted can redirect nothing the user could not write anyway. One ``Healer`` per state
directory lives as long as the helper, so what it remembers between attempts is kept.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from provenanced.daemon.heal import Healer, HealOutcome
from provenanced.fs import userhelper, wire
from provenanced.fs.asuser import UserHelper
from provenanced.fs.facts import FactReader
from provenanced.model import ExpectedLink, FileFact, Finding, UnitDir

HEAL_HELPER = "provenanced.daemon.healasuser"


def helper_operations(reader: FactReader) -> dict[str, userhelper.Handler]:
    """The ``heal`` operation, added to the helper's reads."""
    healers: dict[tuple[str, str], Healer] = {}

    def heal(request: Mapping[str, Any]) -> dict[str, Any]:
        state_dir = wire.from_wire(str, request.get("state_dir"), "state_dir")
        home = wire.from_wire(str, request.get("home"), "home")
        healer = healers.setdefault((state_dir, home), Healer(state_dir, home))
        outcome = healer.heal(
            wire.from_wire(Finding, request.get("finding"), "finding"),
            wire.optional_from_wire(FileFact, request.get("examined"), "examined"),
            wire.optional_from_wire(ExpectedLink, request.get("expected"), "expected"),
            wire.from_wire(tuple[UnitDir, ...], request.get("unit_dirs"), "unit_dirs"),
            **wire.from_wire(dict[str, float], request.get("options", {}), "options"),
        )
        return {"outcome": wire.to_wire(outcome)}

    return {"heal": heal}


async def heal_as_user(
    helper: UserHelper,
    *,
    state_dir: str,
    home: str,
    finding: Finding,
    examined: FileFact | None,
    expected: ExpectedLink | None,
    unit_dirs: Sequence[UnitDir],
    **options: float,
) -> HealOutcome:
    """``Healer(state_dir, home).heal(...)`` run by ``helper`` (started with HEAL_HELPER)."""
    reply = await helper.call(
        "heal",
        state_dir=state_dir,
        home=home,
        finding=wire.to_wire(finding),
        examined=wire.to_wire(examined),
        expected=wire.to_wire(expected),
        unit_dirs=wire.to_wire(tuple(unit_dirs)),
        options=options,
    )
    return await helper.decode(HealOutcome, reply.get("outcome"), "outcome")


if __name__ == "__main__":
    sys.exit(userhelper.main(sys.argv[1:], helper_operations))
