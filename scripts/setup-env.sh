#!/usr/bin/env bash
# Create .venv (if missing) and install annserve into it, editable, with the extras of a role.
#   bash scripts/setup-env.sh                          # demo: client,server (trainer + daemon)
#   bash scripts/setup-env.sh client,server,test,docs  # tests, lint, types, docs (scripts/test.sh)
#   bash scripts/setup-env.sh server                   # the daemon alone: no torch
#   bash scripts/setup-env.sh client                   # a trainer alone
# VENV=path picks another environment than .venv.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras="${1:-client,server}"
venv="${VENV:-.venv}"
if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
fi
if [[ ",$extras," == *,client,* ]]; then
    # torch first and pinned: 2.13.0 is a CPU wheel on these machines; an unpinned torch
    # (asked for by the client extra) would pull a multi-GB CUDA build.
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
fi
"$venv/bin/python" -m pip install --quiet -e ".${extras:+[$extras]}"
