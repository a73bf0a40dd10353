"""A stand-in for podman's quadlet user generator (Debian 12's podman 4.3 predates quadlet).

It follows quadlet's real operation, as podman's cmd/quadlet/main.go does it: run by the manager
at every daemon-reload with the normal generator directory as argv[1]; read the rootless search
path in order (pkg/systemd/quadlet/unitdirs.go getRootlessDirs: runtime, config, then /etc's
``users`` directories; a name found earlier wins, main.go loadUnitsFromDir); write one unit per source, ``web.container`` →
``web.service``, with ``SourcePath=`` the source as found, not resolved; ``WantedBy=`` in
``[Install]`` becomes a ``<target>.wants/`` link in the output directory. The ``[Container]`` to
``[Service]`` translation is left out: the unit only echoes the image it would run.
"""

from __future__ import annotations

import os
from pathlib import Path

GENERATOR_NAME = "podman-user-generator"

_SCRIPT = r"""#!/bin/sh
set -eu
out="$1"
uid=$(id -u)
seen=" "
for dir in "${XDG_RUNTIME_DIR:-/run/user/$uid}/containers/systemd" \
           "${XDG_CONFIG_HOME:-$HOME/.config}/containers/systemd" \
           /etc/containers/systemd/users "/etc/containers/systemd/users/$uid"; do
    [ -d "$dir" ] || continue
    for src in "$dir"/*.container; do
        [ -e "$src" ] || continue
        name=$(basename "$src" .container)
        case "$seen" in *" $name "*) continue ;; esac
        seen="$seen$name "
        image=$(sed -n 's/^Image=//p' "$src" | head -n 1)
        tmp="$out/.$name.service.tmp"
        printf '[Unit]\nDescription=%s container (generated)\nSourcePath=%s\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/echo %s\n' \
            "$name" "$src" "$image" > "$tmp"
        mv "$tmp" "$out/$name.service"
        for target in $(sed -n 's/^WantedBy=//p' "$src"); do
            mkdir -p "$out/$target.wants"
            ln -sf "../$name.service" "$out/$target.wants/$name.service"
        done
    done
done
"""


def install_generator(generator_dir: Path) -> Path:
    """Place the stand-in generator in a directory the manager runs generators from."""
    generator_dir.mkdir(parents=True, exist_ok=True)
    path = generator_dir / GENERATOR_NAME
    tmp = generator_dir / f".{GENERATOR_NAME}.tmp"
    tmp.write_text(_SCRIPT)
    tmp.chmod(0o755)
    os.replace(tmp, path)
    return path


def container_source(image: str, publish: str = "") -> str:
    """The text of a small ``.container`` file."""
    lines = ["[Container]", f"Image={image}"]
    if publish:
        lines.append(f"PublishPort={publish}")
    return "\n".join([*lines, "", "[Install]", "WantedBy=default.target", ""])
