#!/usr/bin/env bash
# Create .venv (if missing) and install annserve into it, editable, with optional extras.
#   bash scripts/setup-env.sh            # runtime only
#   bash scripts/setup-env.sh test       # + test dependencies
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1:-}"
if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
fi
# torch first and pinned: 2.13.0 is a CPU wheel on these machines; an unpinned torch
# (asked for by annserve's own requirement) would pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
