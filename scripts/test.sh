#!/usr/bin/env bash
# Set up .venv with the test dependencies, run the static checks, then the whole test suite.
#   bash scripts/test.sh [pytest args...]
# Checks, in order (each failure stops the script): ruff check, ruff format --check, mypy
# (config in pyproject.toml), lint-imports (when pyproject.toml has [tool.importlinter]),
# the API docs built with warnings as errors (docs/, output in docs/_build/html), pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n== test.sh: %s\n' "$*" >&2; }

step "setting up .venv (client, server, test, docs extras)"
bash scripts/setup-env.sh client,server,test,docs

step "ruff check ."
.venv/bin/ruff check .
step "ruff format --check ."
.venv/bin/ruff format --check .
step "mypy"
.venv/bin/mypy
if grep -q '^\[tool\.importlinter\]' pyproject.toml; then
    step "lint-imports"
    # grimp walks the namespace package's directories: all three roots on the path (the
    # editable install's import hook would give it src/annserve only)
    PYTHONPATH=src:server:client .venv/bin/lint-imports
else
    step "lint-imports skipped: pyproject.toml has no [tool.importlinter] section"
fi
step "docs: sphinx-build -W --keep-going -b html docs docs/_build/html"
.venv/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

step "pytest $*"
.venv/bin/python -m pytest "$@"
