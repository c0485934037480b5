#!/usr/bin/env bash
# Installs libtorch 2.13.0 (what tch 0.26 links against) from PyPI into a
# project-local virtual environment, idempotently, and exports the
# environment a build of mgpo-tch needs:
#
#   LIBTORCH_USE_PYTORCH=1   torch-sys takes libtorch from the venv's torch
#   PATH                     the venv's python first (torch-sys runs `python3`)
#   LD_LIBRARY_PATH          torch's lib/ (for binaries of other crates; the
#                            tests and examples of mgpo-tch also carry an
#                            rpath to it, see crates/mgpo-tch/build.rs)
#   MGPO_TORCH_PYTHON        the venv's python
#
# Use: `source scripts/setup-libtorch.sh && cargo test -p mgpo-tch`.
# Sourced, it runs itself as a child `bash` (with `set -euo pipefail`, which
# a caller's `if` cannot switch off) to install, then exports; the calling
# shell's options are left alone and a failure makes `source` return 1 (it
# never exits the caller). Executed (`bash scripts/setup-libtorch.sh`), it
# installs and prints two lines: the venv and torch's lib directory.
# Nothing is skipped when libtorch is missing: it is installed, or the
# script fails loudly.
#
# PyTorch's own download site is unreachable here; the PyPI wheel carries the
# same libtorch, and tch's build script finds it with LIBTORCH_USE_PYTORCH=1.
# MGPO_TORCH_VENV overrides the venv location (default: <repo>/.venv-torch).

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  venv="${MGPO_TORCH_VENV:-$root/.venv-torch}"
  want="2.13.0"

  if [ ! -x "$venv/bin/python" ]; then
    echo "setup-libtorch: creating $venv" >&2
    python3 -m venv "$venv"
  fi
  have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
  if [ "$have" != "$want" ]; then
    echo "setup-libtorch: installing torch==$want into $venv (several GB, a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --no-input "torch==$want" numpy
  fi
  "$venv/bin/python" -c 'import numpy' 2>/dev/null || "$venv/bin/python" -m pip install --quiet --no-input numpy

  torch_lib="$("$venv/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
  if [ ! -f "$torch_lib/libtorch_cpu.so" ] && [ ! -f "$torch_lib/libtorch_cpu.dylib" ]; then
    echo "setup-libtorch: $torch_lib has no libtorch_cpu library" >&2
    exit 1
  fi
  echo "setup-libtorch: torch $want at $torch_lib" >&2
  echo "$venv"
  echo "$torch_lib"
  exit 0
fi

# Sourced from here on.
_mgpo_libtorch_setup() {
  local out venv torch_lib
  if ! out="$(bash "${BASH_SOURCE[0]}")"; then
    echo "setup-libtorch: FAILED to install libtorch (torch==2.13.0); mgpo-tch cannot be built" >&2
    return 1
  fi
  venv="$(printf '%s\n' "$out" | sed -n 1p)"
  torch_lib="$(printf '%s\n' "$out" | sed -n 2p)"

  export LIBTORCH_USE_PYTORCH=1
  export MGPO_TORCH_PYTHON="$venv/bin/python"
  # Prepend each directory once, so sourcing twice changes nothing.
  case ":$PATH:" in *":$venv/bin:"*) ;; *) export PATH="$venv/bin:$PATH" ;; esac
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$torch_lib:"*) ;;
    *) export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
  esac
}

if _mgpo_libtorch_setup; then
  unset -f _mgpo_libtorch_setup
else
  unset -f _mgpo_libtorch_setup
  return 1
fi
