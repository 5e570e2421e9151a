#!/usr/bin/env bash
# Prints the libclang shared libraries bindgen would load, one per line, in the order
# clang-sys prefers their directories; exits 1 when there is none.
#
# bindgen loads libclang at run time through clang-sys (1.9, feature `runtime`), whose
# search (build/common.rs, build/dynamic.rs: find(runtime = true)) this mirrors on Linux:
# - file names libclang.so, libclang-*.so, libclang.so.*, libclang-*.so.*, except
#   any containing "-cpp." (libclang-cpp.so.N is the C++ library, which bindgen cannot
#   use: a machine with only libclang-cpp has no libclang);
# - only 64-bit ELF files (32-bit on a 32-bit machine): clang-sys skips the others;
# - if LIBCLANG_PATH is set, only there (a directory, or the library file itself);
#   else in `llvm-config --prefix` bin/, lib/, lib64/ (llvm-config from
#   LLVM_CONFIG_PATH, else the PATH), LD_LIBRARY_PATH, LIBRARY_PATH, then the Linux
#   directory patterns below.
# FIND_LIBCLANG_ROOT (for tests) is put in front of those patterns, as clang-sys's
# own tests do, so fixture directories can stand in for the machine's.
set -uo pipefail
shopt -s nullglob dotglob

root=${FIND_LIBCLANG_ROOT:-}
# clang-sys DIRECTORIES_LINUX, in its order of preference.
patterns=(
    "/usr/local/llvm*/lib*"
    "/usr/local/lib*/*/*"
    "/usr/local/lib*/*"
    "/usr/local/lib*"
    "/usr/lib*/*/*"
    "/usr/lib*/*"
    "/usr/lib*"
)
names=("libclang.so" "libclang-*.so" "libclang.so.*" "libclang-*.so.*")

if [ "$(getconf LONG_BIT 2>/dev/null)" = 32 ]; then elf_class=01; else elf_class=02; fi

# Whether a file is an ELF shared object of this machine's word size.
loadable() {
    local header
    header=$(od -An -tx1 -N5 "$1" 2>/dev/null | tr -d ' \n')
    [ "$header" = "7f454c46$elf_class" ]
}

# The matching file names in one directory (never through a subdirectory).
search_dir() {
    local dir=$1 name file base
    [ -d "$dir" ] || return 0
    shopt -u nocaseglob
    for name in "${names[@]}"; do
        for file in "$dir"/$name; do
            base=${file##*/}
            [[ $base == *-cpp.* ]] && continue
            [ -f "$file" ] || continue
            printf '%s\n' "$file"
        done
    done
}

candidates() {
    if [ -n "${LIBCLANG_PATH+set}" ]; then
        local path=${LIBCLANG_PATH%/}
        local parent=${path%/*} base=${path##*/}
        [ "$parent" = "$path" ] && parent=.
        if search_dir "$parent" | grep -qxF -- "$parent/$base"; then
            printf '%s\n' "$parent/$base"
            return 0
        fi
        search_dir "$path"
        return 0
    fi
    local prefix dir
    if prefix=$("${LLVM_CONFIG_PATH:-llvm-config}" --prefix 2>/dev/null) && [ -n "$prefix" ]; then
        prefix=$(printf '%s\n' "$prefix" | head -1)
        for dir in "$prefix/bin" "$prefix/lib" "$prefix/lib64"; do
            search_dir "$dir"
        done
    fi
    local list
    for list in "${LD_LIBRARY_PATH:-}" "${LIBRARY_PATH:-}"; do
        IFS=: read -r -a dirs <<<"$list"
        for dir in "${dirs[@]}"; do
            [ -n "$dir" ] && search_dir "$dir"
        done
    done
    local pattern
    for pattern in "${patterns[@]}"; do
        shopt -s nocaseglob
        for dir in "$root"$pattern; do
            [ -d "$dir" ] && search_dir "$dir"
        done
    done
}

found=1
declare -A seen=()
while IFS= read -r file; do
    [ -n "${seen[$file]:-}" ] && continue
    seen[$file]=1
    if loadable "$file"; then
        printf '%s\n' "$file"
        found=0
    fi
done < <(candidates)
exit $found
