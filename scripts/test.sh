#!/usr/bin/env bash
# The whole test suite, every backend included, on a fresh machine:
# installs libtorch for the tch backend and Open MPI for mgpo-mpi, runs
# every crate's tests (mgpo-mpi's start mpirun themselves), runs the
# conformance vectors on every backend through the CLI, and re-checks the
# float64 vector generator against every vector (the copies of the original
# example set included) and torch.
set -euo pipefail
cd "$(dirname "$0")/.."
vectors=crates/mgpo-conformance/vectors

# shellcheck source=scripts/setup-libtorch.sh
source scripts/setup-libtorch.sh
# Open MPI and libclang for mgpo-mpi's `mpi` feature and its mpirun tests.
bash scripts/setup-mpi.sh
# WordNet, peft and transformers in the venv, and the sha256-checked
# all-MiniLM-L6-v2 for mgpo-finetune's tests (scripts/test-finetune.sh).
bash scripts/setup-wordnet.sh
"$MGPO_TORCH_PYTHON" -c 'import peft, transformers' 2>/dev/null \
  || "$MGPO_TORCH_PYTHON" -m pip install --quiet --no-input "peft>=0.17" "transformers>=4.50"
MGPO_MINILM_DIR="$(bash scripts/fetch-minilm.sh)"
export MGPO_MINILM_DIR

# Property tests explore new cases on every developer run; CI replays a fixed seed.
export PROPTEST_RNG_SEED="${PROPTEST_RNG_SEED:-20261130}"

echo "== cargo test (all crates, all backends)"
cargo test --workspace --all-features

echo "== mgpo conformance --backend all"
# The binary of the workspace build above (same features: `cargo run -p
# mgpo-cli` would unify features differently and rebuild the dependencies).
cargo build -q --workspace --all-features --bins
"${CARGO_TARGET_DIR:-target}/debug/mgpo" conformance --backend all --vectors "$vectors"

echo "== rustdoc: every crate documents without a warning"
RUSTDOCFLAGS="-D warnings" cargo doc -q --workspace --all-features --no-deps

echo "== float64 generator: reproduces every vector, agrees with torch, and regenerates the committed vectors"
python tools/gen_vectors.py --check-shared "$vectors"
python tools/gen_vectors.py --check-torch
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python tools/gen_vectors.py --out "$tmp"
for f in "$tmp"/*.json; do
  cmp "$f" "$vectors/$(basename "$f")" || { echo "test.sh: committed vector $(basename "$f") differs from the generator's output" >&2; exit 1; }
done

echo "== packaging: every publishable crate packages; core, conformance and ndarray build from their packages; examples/vec-backend passes the kit against the unpacked copies"
bash scripts/package-check.sh

echo "test.sh: all checks passed"
