#!/usr/bin/env bash
# Packaging, tested the way a user gets the crates.
#
# 1. `cargo package --no-verify` of every publishable crate in one
#    multi-package call, as `cargo publish` would: cheap (nothing is
#    built), and it fails if any crate stops packaging (a dependency without
#    a version, a file outside the package, a manifest error). Each packaged
#    crate is checked to name no path outside its package (manifest,
#    include!s, CARGO_MANIFEST_DIR/..). The facade lora-mgpo, mgpo-bench
#    and the `mgpo` command mgpo-cli cannot be packaged yet (burn and tch
#    conflict, see `blocked` below).
# 2. `cargo package` with verification of the crates to check (which builds
#    each one from its packaged sources), unpack the .crate files, and run
#    the tests of examples/vec-backend, an outside crate that is no
#    workspace member, against the unpacked copies only (a
#    [patch.crates-io] given on the command line, generated here).
# Fails if a crate stops packaging, if a packaged crate misses its vectors,
# or if the outside backend fails the conformance kit.
#
# usage: scripts/package-check.sh [--all] [crate...]
#   default: verify mgpo-core mgpo-conformance mgpo-ndarray (minutes on 2
#            cores; step 1 always covers every crate)
#   --all:   also verify mgpo-candle mgpo-dfdx mgpo-burn mgpo-mpi (slow:
#            each is built from its package). mgpo-tch (needs libtorch:
#            `source scripts/setup-libtorch.sh` first), mgpo-experiments and
#            mgpo-finetune (slow) are verified by naming them.
#   Offline (no crates.io): CARGO_NET_OFFLINE=true, with the dependencies
#   already in cargo's cache (a workspace build puts them there).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

crates=()
for arg in "$@"; do
    case "$arg" in
        --all) crates+=(mgpo-core mgpo-conformance mgpo-ndarray mgpo-candle mgpo-dfdx mgpo-burn mgpo-mpi) ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
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

# Every crate that is published: the library crates, the facade, the CLI.
publishable=(mgpo-core mgpo-conformance mgpo-ndarray mgpo-candle mgpo-dfdx mgpo-burn
             mgpo-tch mgpo-mpi mgpo-experiments mgpo-finetune)
# Not yet: these three have both burn (optional) and tch (optional) in
# their graph. burn 0.22.1 brings burn-tch -> torch-sys 0.22 into every
# lockfile (cargo's resolver takes its weak `burn-tch?/std` features as
# strong), tch 0.26 brings torch-sys 0.26, and both say `links = "tch"`:
# their lockfile cannot be resolved outside this workspace (whose
# [patch.crates-io] replaces burn-tch), so `cargo package`, `cargo publish`
# and `cargo install mgpo-cli` fail with "links to the native library
# `tch`, but it conflicts". A published crate can have one of the two.
blocked=(lora-mgpo mgpo-bench mgpo-cli)

# A packaged .crate exists, and its manifest names no path: every
# dependency is a registry one. Unpacks it into $1.
check_crate() {
    local dest=$1 c=$2 v file
    v=$(version_of "$c")
    file="$root/target/package/$c-$v.crate"
    [ -f "$file" ] || { echo "package-check: $file was not produced" >&2; exit 1; }
    tar -xzf "$file" -C "$dest"
    if grep -nE '^[^#]*\bpath *= *"\.\.' "$dest/$c-$v/Cargo.toml"; then
        echo "package-check: $c's packaged manifest points outside its package" >&2
        exit 1
    fi
    # Every file that the library, binary or build script include!s is in
    # the package (a file outside it breaks the build from the registry),
    # and none of them reaches past CARGO_MANIFEST_DIR at run time. Tests
    # may read the repository: they are not run from the package.
    local dirs=() d hit f lit target pkg
    for d in src build.rs; do [ -e "$dest/$c-$v/$d" ] && dirs+=("$dest/$c-$v/$d"); done
    [ ${#dirs[@]} -gt 0 ] || return 0
    pkg=$(realpath "$dest/$c-$v")
    while IFS= read -r hit; do
        f=${hit%%:*}
        lit=${hit#*\"}; lit=${lit%\"*}
        target=$(realpath -m "$(dirname "$f")/$lit")
        case "$target" in
            "$pkg"/*) [ -f "$target" ] || { echo "package-check: $c: $hit: $lit is not in the package" >&2; exit 1; } ;;
            *) echo "package-check: $c: $hit: $lit is outside the package" >&2; exit 1 ;;
        esac
    done < <(grep -rnoE --include='*.rs' '(include_str|include_bytes|include)!\( *"[^"]+"' "${dirs[@]}" || true)
    if grep -rnE --include='*.rs' 'CARGO_MANIFEST_DIR.*"\.\.' "${dirs[@]}"; then
        echo "package-check: $c reaches outside its package from CARGO_MANIFEST_DIR" >&2
        exit 1
    fi
}

allargs=()
for c in "${publishable[@]}"; do allargs+=(-p "$c"); done
echo "== cargo package --no-verify ${publishable[*]}"
cargo package --no-verify --allow-dirty "${allargs[@]}"
listed="$work/listed"
rm -rf "$listed"
mkdir -p "$listed"
for c in "${publishable[@]}"; do check_crate "$listed" "$c"; done
rm -rf "$listed"

pargs=()
for c in "${crates[@]}"; do pargs+=(-p "$c"); done
echo "== cargo package (verified) ${crates[*]}"
cargo package --allow-dirty "${pargs[@]}"

for c in "${crates[@]}"; do check_crate "$unpacked" "$c"; done

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
echo "== package-check passed: packaged ${publishable[*]}; verified ${crates[*]}"
echo "== not packaged (burn + tch links conflict, see above): ${blocked[*]}"
