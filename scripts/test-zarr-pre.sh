#!/usr/bin/env bash
# Run tests/io against zarr's newest pre-release, in a throwaway venv; report, never fail.
#   bash scripts/test-zarr-pre.sh
# Exits 0 when no pre-release newer than the latest zarr release is published (nothing to
# test), 0 when tests/io pass against it, and 1 (with a warning) when they fail or the
# pre-release does not install: .ci/run only reports that. Needs .venv (scripts/setup-env.sh).
# ZARR_PRE=VERSION tests that zarr version instead (to try this script itself).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'test-zarr-pre: %s\n' "$*" >&2; }

# the newest zarr pip sees, pre-releases included, and the newest release
newest_pre="$(.venv/bin/python -m pip index versions --pre zarr 2>/dev/null | sed -n 's/^zarr (\(.*\))$/\1/p')"
newest="$(.venv/bin/python -m pip index versions zarr 2>/dev/null | sed -n 's/^zarr (\(.*\))$/\1/p')"
if [[ -n "${ZARR_PRE:-}" ]]; then
    newest_pre="$ZARR_PRE" newest=""
elif [[ -z "$newest_pre" ]]; then
    log "warning: could not list zarr's versions; skipped"
    exit 1
fi
if ! .venv/bin/python - "$newest_pre" "$newest" <<'PY'
import sys
from packaging.version import Version
pre, release = Version(sys.argv[1]), Version(sys.argv[2] or "0")
sys.exit(0 if not sys.argv[2] or (pre.is_prerelease and pre > release) else 1)
PY
then
    log "no zarr pre-release newer than the latest release ($newest): nothing to test"
    exit 0
fi

log "zarr $newest_pre: throwaway venv, then tests/io"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
VENV="$tmp/venv" bash scripts/setup-env.sh client,server,test
# pip warns (and goes on) when this breaks annserve's upper bound on zarr: that is the point
"$tmp/venv/bin/python" -m pip install --quiet --pre "zarr==$newest_pre"
if "$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider tests/io; then
    log "tests/io pass against zarr $newest_pre"
else
    log "warning: tests/io FAIL against zarr $newest_pre (the release CI tested passes)"
    exit 1
fi
