#!/usr/bin/env bash
# Set up a fresh Debian machine for provenanced: Debian packages (only when missing), .venv, pip.
# Usage: scripts/bootstrap.sh [--test]   (--test adds the packages the test suite uses)
set -euo pipefail
cd "$(dirname "$0")/.."

# systemd-python builds from source; the tests boot a real systemd --user, journald and promtool,
# and mount a real FUSE file system (libfuse 3 and fusermount3).
build_deps=(gcc pkg-config libsystemd-dev)
runtime_deps=(systemd dbus-daemon dbus-user-session)
test_deps=(prometheus fuse3)

wanted=("${build_deps[@]}" "${runtime_deps[@]}")
[[ "${1:-}" == "--test" ]] && wanted+=("${test_deps[@]}")

missing=()
for pkg in "${wanted[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done

if ((${#missing[@]})); then
    if [[ $EUID -ne 0 ]]; then
        echo "provenanced: missing packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" \
             "(Fedora: sudo dnf install gcc pkgconf systemd-devel dbus-daemon golang-github-prometheus fuse3)" >&2
        exit 2
    fi
    echo "bootstrap: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
