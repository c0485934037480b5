#!/usr/bin/env bash
# Installs WordNet 3.0 (Debian's `wordnet-base`: the database in
# /usr/share/wordnet), the default data of `mgpo finetune` (noun glosses
# labelled by supersense). Idempotent; uses sudo when not root.
set -euo pipefail
if [ -f /usr/share/wordnet/data.noun ]; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
$sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >&2
test -f /usr/share/wordnet/data.noun
