#!/usr/bin/env bash
# Installs libtorch 2.13.0 (what tch 0.26 links against) from PyPI into a
# project-local virtual environment, idempotently, and prints the environment
# a build of mgpo-tch needs. Source it (`. scripts/setup-libtorch.sh`) to get
# the variables exported into the calling shell.
#
# PyTorch's own download site is unreachable here; the PyPI wheel carries the
# same libtorch, and tch's build script finds it with LIBTORCH_USE_PYTORCH=1.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MGPO_TORCH_VENV:-$root/.venv-torch}"
want="2.13.0"

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
have="$("$venv/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [ "$have" != "$want" ]; then
  echo "setup-libtorch: installing torch==$want into $venv (several GB, a few minutes)" >&2
  "$venv/bin/python" -m pip install --quiet --no-input "torch==$want" numpy
fi
"$venv/bin/python" -c 'import numpy' 2>/dev/null || "$venv/bin/python" -m pip install --quiet --no-input numpy

torch_lib="$("$venv/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
[ -f "$torch_lib/libtorch_cpu.so" ] || { echo "setup-libtorch: $torch_lib has no libtorch_cpu.so" >&2; exit 1; }

export LIBTORCH_USE_PYTORCH=1
export PATH="$venv/bin:$PATH"
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MGPO_TORCH_PYTHON="$venv/bin/python"
echo "setup-libtorch: torch $want at $torch_lib" >&2
