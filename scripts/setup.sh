#!/usr/bin/env bash
# Set up a fresh checkout: create .venv with Python 3.11, install the pinned
# requirements and cdlib (editable), and install MathJax 3 into .mathjax/ so
# the built book renders math offline. Re-running it is safe.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python3.11 -m venv .venv
.venv/bin/python -m pip install -r requirements.txt -e .
npm install --prefix .mathjax --no-audit --no-fund mathjax@3.2.2
