#!/usr/bin/env bash
# Packaging, tested the way a user gets the crates: `cargo package` the
# library crates (which also builds each one from its packaged sources),
# unpack the .crate files, and run the tests of examples/vec-backend, an
# outside crate that is no workspace member, against the unpacked copies
# only (a [patch.crates-io] given on the command line, generated here).
# Fails if a crate stops packaging, if a packaged crate misses its vectors,
# or if the outside backend fails the conformance kit.
#
# usage: scripts/package-check.sh [--all] [crate...]
#   default: mgpo-core mgpo-conformance mgpo-ndarray (minutes on 2 cores)
#   --all:   also mgpo-candle mgpo-dfdx mgpo-burn mgpo-mpi and the facade
#            lora-mgpo (slow: each is built from its package). mgpo-tch
#            needs libtorch to verify and is left to a machine with it
#            (`source scripts/setup-libtorch.sh`, then name it).
#   Offline (no crates.io): CARGO_NET_OFFLINE=true, with the dependencies
#   already in cargo's cache (a workspace build puts them there).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

crates=()
for arg in "$@"; do
    case "$arg" in
        --all) crates+=(mgpo-core mgpo-conformance mgpo-ndarray mgpo-candle mgpo-dfdx mgpo-burn mgpo-mpi lora-mgpo) ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) crates+=("$arg") ;;
    esac
done
if [ ${#crates[@]} -eq 0 ]; then
    crates=(mgpo-core mgpo-conformance mgpo-ndarray)
fi
# The outside crate needs these two, whatever else is checked.
for need in mgpo-core mgpo-conformance; do
    case " ${crates[*]} " in *" $need "*) ;; *) crates+=("$need") ;; esac
done

work="$root/target/package-check"
unpacked="$work/unpacked"
rm -rf "$unpacked"
mkdir -p "$unpacked"

version_of() {
    # `cargo pkgid` prints path+file:///...#name@version (or #version).
    cargo pkgid -p "$1" | sed -E 's/.*[#@]([0-9][^#@]*)$/\1/'
}

pargs=()
for c in "${crates[@]}"; do pargs+=(-p "$c"); done
echo "== cargo package ${crates[*]}"
cargo package --allow-dirty "${pargs[@]}"

for c in "${crates[@]}"; do
    v=$(version_of "$c")
    file="$root/target/package/$c-$v.crate"
    [ -f "$file" ] || { echo "package-check: $file was not produced" >&2; exit 1; }
    tar -xzf "$file" -C "$unpacked"
    # A packaged manifest names no path: every dependency is a registry one.
    if grep -nE '^[^#]*\bpath *= *"\.\.' "$unpacked/$c-$v/Cargo.toml"; then
        echo "package-check: $c's packaged manifest points outside its package" >&2
        exit 1
    fi
done

v=$(version_of mgpo-conformance)
n=$(find "$unpacked/mgpo-conformance-$v/vectors" -name '*.json' | wc -l)
[ "$n" -ge 35 ] || { echo "package-check: the packaged mgpo-conformance holds $n vectors" >&2; exit 1; }
echo "== packaged mgpo-conformance holds $n vectors"

patches=()
for c in mgpo-core mgpo-conformance; do
    patches+=(--config "patch.crates-io.$c.path=\"$unpacked/$c-$(version_of "$c")\"")
done
echo "== examples/vec-backend against the unpacked crates"
CARGO_TARGET_DIR="$work/target" cargo test --manifest-path examples/vec-backend/Cargo.toml "${patches[@]}"
# The build above used the unpacked copies, nothing from the workspace.
meta=$(cargo metadata --format-version 1 --manifest-path examples/vec-backend/Cargo.toml "${patches[@]}")
case "$meta" in
    *"\"$unpacked/mgpo-conformance-$v/Cargo.toml\""*) ;;
    *) echo "package-check: examples/vec-backend did not resolve mgpo-conformance to $unpacked" >&2; exit 1 ;;
esac
echo "== package-check passed: ${crates[*]}"
