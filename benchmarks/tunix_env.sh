#!/usr/bin/env bash
# A separate virtual env holding Google's Tunix and jaxrlhf side by side, for
# benchmarks/tunix_side_by_side.py. Tunix is never a dependency of jaxrlhf: it pins older
# safetensors (< 0.8) and transformers than jaxrlhf's own env, so it gets an env of its own.
#
#   bash benchmarks/tunix_env.sh                 # creates /work/venv-tunix
#   bash benchmarks/tunix_env.sh /tmp/venv-tunix # or another path
#   /work/venv-tunix/bin/python benchmarks/tunix_side_by_side.py --quick
#
# PYTHON picks the interpreter the env is built from (default: python3, 3.11 here).
set -euo pipefail

VENV="${1:-/work/venv-tunix}"
PYTHON="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TUNIX_VERSION="0.1.7"

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --upgrade pip
# Tunix first: its pins (safetensors, transformers, jax) decide the versions of the shared packages.
"${PIP[@]}" install "google-tunix==${TUNIX_VERSION}"
# jaxrlhf without its own pins, then the imports it needs that Tunix's pins leave out; pip keeps
# the versions already installed where they satisfy these ranges.
"${PIP[@]}" install -e "$REPO" --no-deps
"${PIP[@]}" install "optax>=0.2.4" "orbax-checkpoint>=0.11" "chex>=0.1.88" "tyro>=0.9" \
  "tensorboardX>=2.6" "matplotlib>=3.8" "tqdm>=4.66" "numpy>=1.26"
"${PIP[@]}" check || echo "pip check reported conflicts (above); the import check below decides"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md

import jax
import jaxrlhf
import tunix

print("jax", jax.__version__, "| flax", md.version("flax"), "| tunix", md.version("google-tunix"))
print("transformers", md.version("transformers"), "| safetensors", md.version("safetensors"))
print("jaxrlhf from", jaxrlhf.__file__)
PY
