#!/usr/bin/env bash
# Makes sure the project's Python environment (.venv) exists and holds the packages
# of the requirement files given, then prints the path of its python.
#   scripts/venv.sh tests/clients/requirements.txt clients/python/requirements-test.txt
# Installs python3 and venv support from Debian if they are missing (as root, or with
# sudo). A requirement file is re-installed only when it changed.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$PWD/.venv

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if [ ! -x "$venv/bin/python" ]; then
    if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv --help >/dev/null 2>&1; then
        echo "installing: python3 python3-venv python3-pip" >&2
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get update -qq >&2
        as_root apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
    fi
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >&2; then
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        export DEBIAN_FRONTEND=noninteractive
        as_root apt-get install -y -qq python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
    fi
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi
for req in "$@"; do
    [ -f "$req" ] || { echo "no such requirements file: $req" >&2; exit 1; }
    stamp="$venv/.installed-$(printf '%s' "$req" | tr '/' '_')"
    if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ]; then
        echo "installing Python packages from $req into .venv" >&2
        "$venv/bin/python" -m pip install -q -r "$req" >&2
        touch "$stamp"
    fi
done
echo "$venv/bin/python"
