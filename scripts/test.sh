#!/usr/bin/env bash
# The whole test suite, every backend included, on a fresh machine:
# installs libtorch for the tch backend and Open MPI for mgpo-mpi, runs
# every crate's tests (mgpo-mpi's start mpirun themselves), runs the
# conformance vectors on every backend through the CLI, and re-checks the
# float64 vector generator against the shared vectors and torch.
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${MGPO_SHARED_VECTORS:-../shared/conformance/vectors}"
[ -d "$shared" ] || { echo "test.sh: shared vectors not found at $shared" >&2; exit 1; }

# shellcheck source=scripts/setup-libtorch.sh
source scripts/setup-libtorch.sh
# Open MPI and libclang for mgpo-mpi's `mpi` feature and its mpirun tests.
bash scripts/setup-mpi.sh

# Property tests explore new cases on every developer run; CI replays a fixed seed.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261130}"

echo "== cargo test (all crates, all backends)"
cargo test --workspace --all-features

echo "== mgpo conformance --backend all"
cargo run -q -p mgpo-cli --all-features -- conformance --backend all \
  --vectors conformance/vectors --vectors "$shared"

echo "== float64 generator: agrees with the shared vectors and torch, and reproduces the committed vectors"
python tools/gen_vectors.py --check-shared "$shared"
python tools/gen_vectors.py --check-torch
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python tools/gen_vectors.py --out "$tmp"
for f in "$tmp"/*.json; do
  cmp "$f" "conformance/vectors/$(basename "$f")" || { echo "test.sh: committed vector $(basename "$f") differs from the generator's output" >&2; exit 1; }
done
echo "test.sh: all checks passed"
