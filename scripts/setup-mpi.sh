#!/usr/bin/env bash
# Installs what crates/mgpo-mpi needs with its `mpi` feature, idempotently:
# Open MPI from Debian's packages (`libopenmpi-dev` for the headers and
# `mpicc`, which the `mpi` crate's build script asks for the compiler and
# link flags; `openmpi-bin` for `mpirun`) and libclang, which the crate's
# bindgen step loads to read mpi.h. Does nothing when all are present; runs
# `apt-get update` once before installing otherwise. Needs root (CI runs as
# root) or sudo.
#
# Use: `bash scripts/setup-mpi.sh && cargo test -p mgpo-mpi --features mpi`.
# How mpirun is started on a single machine without a network (as root,
# oversubscribed) is in docs/distributed.md and crates/mgpo-mpi/src/launch.rs.
set -euo pipefail

packages=(libopenmpi-dev openmpi-bin libclang-dev)
missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup-mpi: need root or sudo to install ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup-mpi: installing ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

for tool in mpirun mpicc; do
  command -v "$tool" >/dev/null || { echo "setup-mpi: $tool not found after installing ${packages[*]}" >&2; exit 1; }
done
echo "setup-mpi: $(mpirun --version 2>/dev/null | head -n 1)" >&2
