#!/usr/bin/env bash
# One command for the benchmarks: installs what they need (the project's .venv, Node's ws
# package) and runs them side by side in one run. Output: tables on stdout, JSON in results/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q -e .
(cd benchmarks && npm install --silent --no-audit --no-fund)
.venv/bin/python benchmarks/ws_vs_hpush.py "$@"
