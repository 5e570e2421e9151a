#!/usr/bin/env bash
# Installs the Debian packages the build and tests need, if they are missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
if ! command -v redis-cli >/dev/null 2>&1 || ! command -v redis-benchmark >/dev/null 2>&1; then
    missing+=(redis-tools)
fi
# What bindgen loads (libclang.so*, libclang-N.so*), not libclang-cpp.so.N, which
# images ship without libclang (scripts/find-libclang.sh mirrors bindgen's search).
if ! "$(dirname "$0")/find-libclang.sh" >/dev/null; then
    missing+=(libclang-dev)
fi
# The Node clients' tests (ioredis, node-redis) need node and npm.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing: ${missing[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        sudo=sudo
        command -v sudo >/dev/null 2>&1 || { echo "need root (or sudo) to install ${missing[*]}" >&2; exit 1; }
    else
        sudo=
    fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" libclang-dev "* ]] && ! "$(dirname "$0")/find-libclang.sh" >/dev/null; then
        echo "libclang-dev is installed but bindgen would still find no libclang;" \
            "set LIBCLANG_PATH to the directory holding libclang.so" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install Rust (https://rustup.rs) and try again" >&2
    exit 1
fi
