#!/usr/bin/env bash
# Tests scripts/find-libclang.sh on fixture directories (run by `make test`): it must
# find what bindgen's loader (clang-sys) would load, and nothing else — in particular
# not libclang-cpp, the C++ library a Debian image ships without libclang.
set -uo pipefail
cd "$(dirname "$0")/.."
find_libclang=$PWD/scripts/find-libclang.sh

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
cases=0

# A fake shared library: the ELF header is all the loader's check reads.
elf64() { mkdir -p "$(dirname "$1")" && printf '\177ELF\002\001\001' >"$1"; }
elf32() { mkdir -p "$(dirname "$1")" && printf '\177ELF\001\001\001' >"$1"; }

# A fixture machine: a fresh root directory standing in for /.
fresh_root() {
    root=$tmp/root$cases
    mkdir -p "$root/usr/lib" "$root/usr/local/lib"
}

# Runs the finder against the current fixture root, nothing from this machine.
run_find() {
    env -u LIBCLANG_PATH -u LD_LIBRARY_PATH -u LIBRARY_PATH \
        LLVM_CONFIG_PATH="$tmp/no-llvm-config" FIND_LIBCLANG_ROOT="$root" "$@" \
        "$find_libclang"
}

# expect NAME STATUS EXPECTED-OUTPUT [env assignments...]
expect() {
    local name=$1 want_status=$2 want_out=$3
    shift 3
    cases=$((cases + 1))
    local out status
    out=$(run_find "$@")
    status=$?
    if [ "$status" -eq "$want_status" ] && [ "$out" = "$want_out" ]; then
        echo "ok   $name"
    else
        echo "FAIL $name: exit $status (want $want_status), printed:"
        printf '  %s\n' "$out"
        echo "  want:"
        printf '  %s\n' "$want_out"
        failures=$((failures + 1))
    fi
}

fresh_root
# Debian's libclang-cpp14 alone: the C++ library and its symlink.
elf64 "$root/usr/lib/llvm-14/lib/libclang-cpp.so.14"
mkdir -p "$root/usr/lib/x86_64-linux-gnu"
ln -s ../llvm-14/lib/libclang-cpp.so.14 "$root/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"
expect "only libclang-cpp.so.14: not found" 1 ""

# libclang1-14 adds the versioned C library (what bindgen loads at run time).
elf64 "$root/usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6"
ln -s libclang-14.so.14.0.6 "$root/usr/lib/x86_64-linux-gnu/libclang-14.so.1"
expect "libclang-14.so.1: found" 0 \
    "$(printf '%s\n' "$root/usr/lib/x86_64-linux-gnu/libclang-14.so.1" \
        "$root/usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6")"

fresh_root
elf64 "$root/usr/lib/libclang.so.1"
expect "libclang.so.1: found" 0 "$root/usr/lib/libclang.so.1"

fresh_root
elf64 "$root/usr/local/llvm17/lib/libclang.so"
expect "libclang.so under /usr/local/llvm*/lib*: found" 0 "$root/usr/local/llvm17/lib/libclang.so"

fresh_root
elf32 "$root/usr/lib/libclang.so"
printf 'INPUT(-lclang)\n' >"$root/usr/lib/libclang-14.so"
ln -s missing.so.1 "$root/usr/lib/libclang.so.1"
expect "32-bit, linker script, dangling link: not found" 1 ""

fresh_root
elf64 "$root/usr/lib/deep/er/still/libclang.so"
expect "three levels down is out of clang-sys's patterns: not found" 1 ""

fresh_root
elf64 "$root/usr/lib/x86_64-linux-gnu/libclang-14.so.1"
elf64 "$tmp/custom/libclang.so.1"
expect "LIBCLANG_PATH directory: only it is searched" 0 "$tmp/custom/libclang.so.1" \
    LIBCLANG_PATH="$tmp/custom"
expect "LIBCLANG_PATH naming the library file" 0 "$tmp/custom/libclang.so.1" \
    LIBCLANG_PATH="$tmp/custom/libclang.so.1"
mkdir -p "$tmp/empty"
expect "LIBCLANG_PATH without a library: not found, even if the machine has one" 1 "" \
    LIBCLANG_PATH="$tmp/empty"

fresh_root
elf64 "$tmp/llvm/lib/libclang-17.so"
printf '#!/bin/sh\necho %s\n' "$tmp/llvm" >"$tmp/llvm-config"
chmod +x "$tmp/llvm-config"
expect "llvm-config --prefix lib/: found" 0 "$tmp/llvm/lib/libclang-17.so" \
    LLVM_CONFIG_PATH="$tmp/llvm-config"
elf64 "$tmp/ld/libclang.so"
expect "LD_LIBRARY_PATH: found" 0 "$tmp/ld/libclang.so" LD_LIBRARY_PATH="/nowhere:$tmp/ld"

echo "find-libclang: $((cases - failures))/$cases cases passed"
[ "$failures" -eq 0 ]
