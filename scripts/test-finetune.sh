#!/usr/bin/env bash
# The fine-tuning tests: installs what they need, then runs them.
#   - WordNet 3.0 (scripts/setup-wordnet.sh: apt-get update, wordnet-base)
#   - the torch venv (scripts/setup-libtorch.sh) with peft and transformers
#   - the default model (scripts/fetch-minilm.sh, sha256-checked)
# then `cargo test -p mgpo-finetune`: unit tests, the agreement tests with
# Python (tools/peft_check.py: transformers AutoModel, peft both ways,
# merged == unmerged) and a short `mgpo finetune` run with resume.
# Nothing is skipped: a missing piece is installed or the script fails.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/setup-wordnet.sh
# shellcheck source=/dev/null
source scripts/setup-libtorch.sh
"$MGPO_TORCH_PYTHON" -c 'import peft, transformers' 2>/dev/null \
  || "$MGPO_TORCH_PYTHON" -m pip install --quiet --no-input "peft>=0.17" "transformers>=4.50"
export MGPO_MINILM_DIR="$(bash scripts/fetch-minilm.sh)"

cargo test -p mgpo-finetune
