#!/usr/bin/env bash
# Set up .venv with the test dependencies and run the whole test suite.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup-env.sh test
.venv/bin/python -m pytest "$@"
