#!/usr/bin/env bash
# End-to-end demo: install annserve, obtain the 10x PBMC 3k dataset, serve it with the
# annserve daemon, and train examples/train.py against it.
#
#   bash scripts/demo.sh              # 3 epochs
#   EPOCHS=10 bash scripts/demo.sh
#
# Steps: (a) create .venv if missing and install the project (CPU torch first);
# (b) use ../shared/data/pbmc3k_raw.h5ad when present, else download it into
#     data/pbmc3k_raw.h5ad from the desc==2.1.1 wheel on PyPI (checked by sha256) and
#     convert it from its pre-0.7 anndata format;
# (c) start the daemon on a free port and wait (at most 60 s) until it listens;
# (d) train; (e) stop the daemon with SIGTERM and check that it exits 0.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

EPOCHS="${EPOCHS:-3}"
# ../shared/data/pbmc3k_raw.h5ad, and desc/datasets/pbmc.h5ad of the desc==2.1.1 wheel
PBMC3K_SHA256=dad585d380a22bcdd68592b9c8e43404afe660258e1b62ce4dbc3e58853b9859
DESC_PBMC_SHA256=0c080ce6f36d5ced4c5e932554a9c57606fdef6f0d9481a6e71eaf9278bb6594
STARTUP_TIMEOUT_S=60
STOP_TIMEOUT_S=30

log() { printf 'demo: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

check_sha256() {  # path expected
    local actual
    actual="$(sha256_of "$1")"
    [[ "$actual" == "$2" ]] || die "$1: sha256 $actual, expected $2"
}

# --- (a) environment ------------------------------------------------------------------
log "setting up .venv (CPU torch, annserve)"
bash scripts/setup-env.sh

# --- (b) data ---------------------------------------------------------------------------
TMP_DIR="$(mktemp -d)"
DAEMON_PID=""
DAEMON_LOG="$TMP_DIR/annserve.log"

stop_daemon() {  # sends SIGTERM, waits at most STOP_TIMEOUT_S, sets DAEMON_RC
    local pid="$DAEMON_PID" waited=0
    DAEMON_PID=""
    DAEMON_RC=0
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && (( waited < STOP_TIMEOUT_S * 10 )); do
        sleep 0.1
        waited=$(( waited + 1 ))
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "daemon did not stop within ${STOP_TIMEOUT_S} s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" || DAEMON_RC=$?
}

cleanup() {
    local rc=$?
    if [[ -n "$DAEMON_PID" ]]; then
        stop_daemon
    fi
    if (( rc != 0 )) && [[ -s "$DAEMON_LOG" ]]; then
        log "last lines of the daemon log:"
        tail -n 20 "$DAEMON_LOG" >&2
    fi
    rm -rf "$TMP_DIR"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

download_desc_wheel() {  # dest_dir
    if .venv/bin/pip download --quiet --no-deps desc==2.1.1 -d "$1"; then
        return 0
    fi
    # pip >= 24.1 rejects desc 2.1.1 for its malformed metadata ("matplotlib>=2.2pydot"),
    # even with --no-deps: retry with an older pip in a throwaway venv.
    log "pip download failed; retrying with pip<24.1 in a throwaway venv"
    python3 -m venv "$TMP_DIR/oldpip"
    "$TMP_DIR/oldpip/bin/python" -m pip install --quiet 'pip<24.1'
    "$TMP_DIR/oldpip/bin/python" -m pip download --quiet --no-deps desc==2.1.1 -d "$1"
}

if [[ -f ../shared/data/pbmc3k_raw.h5ad ]]; then
    DATA=../shared/data/pbmc3k_raw.h5ad
    check_sha256 "$DATA" "$PBMC3K_SHA256"
else
    DATA=data/pbmc3k_raw.h5ad
    if [[ ! -f "$DATA" || "$(sha256_of "$DATA")" != "$PBMC3K_SHA256" ]]; then
        log "downloading pbmc3k (desc==2.1.1 wheel, member desc/datasets/pbmc.h5ad)"
        download_desc_wheel "$TMP_DIR/wheel"
        wheel=("$TMP_DIR"/wheel/desc-2.1.1-*.whl)
        [[ -f "${wheel[0]}" ]] || die "pip download left no desc-2.1.1 wheel in $TMP_DIR/wheel"
        .venv/bin/python - "${wheel[0]}" "$TMP_DIR/pbmc_legacy.h5ad" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("desc/datasets/pbmc.h5ad") as src, \
        open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
EOF
        check_sha256 "$TMP_DIR/pbmc_legacy.h5ad" "$DESC_PBMC_SHA256"
        # The member is a pre-0.7 anndata file (h5sparse X, record-array obs/var) that
        # annserve cannot open: rewrite it in the current format, the way
        # ../shared/data/pbmc3k_raw.h5ad was made (same data, plus uns["source"]).
        log "converting it to the current h5ad format"
        .venv/bin/python - "$TMP_DIR/pbmc_legacy.h5ad" "$TMP_DIR/pbmc3k_raw.h5ad" <<'EOF'
import sys
import anndata as ad
adata = ad.read_h5ad(sys.argv[1])
adata.uns["source"] = ("PyPI desc==2.1.1 wheel: desc/datasets/pbmc.h5ad "
                       "(10x Genomics pbmc3k filtered_gene_bc_matrices, hg19)")
adata.write_h5ad(sys.argv[2])
EOF
        mkdir -p data
        mv "$TMP_DIR/pbmc3k_raw.h5ad" "$DATA"
    fi
    actual="$(sha256_of "$DATA")"
    if [[ "$actual" != "$PBMC3K_SHA256" ]]; then
        # The input was verified above; the converted bytes depend on the anndata and h5py
        # versions (anndata 0.12.19 with h5py 3.16.0 reproduce the reference file exactly).
        log "warning: $DATA has sha256 $actual, not the reference $PBMC3K_SHA256:" \
            "the same data written by another anndata/h5py version"
    fi
fi
log "data: $DATA (sha256 checked)"

# --- (c) daemon -------------------------------------------------------------------------
.venv/bin/annserve --store "$DATA" --host 127.0.0.1 --port 0 2>"$DAEMON_LOG" &
DAEMON_PID=$!
PORT=""
for (( i = 0; i < STARTUP_TIMEOUT_S * 10; i++ )); do
    PORT="$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9][0-9]*\).*/\1/p' "$DAEMON_LOG" | head -n 1)"
    [[ -z "$PORT" ]] || break
    kill -0 "$DAEMON_PID" 2>/dev/null || die "annserve exited during startup"
    sleep 0.1
done
[[ -n "$PORT" ]] || die "annserve did not report 'listening on' within ${STARTUP_TIMEOUT_S} s"
log "annserve (pid $DAEMON_PID) listening on 127.0.0.1:$PORT"

# --- (d) train --------------------------------------------------------------------------
.venv/bin/python examples/train.py --address "127.0.0.1:$PORT" --epochs "$EPOCHS"

# --- (e) stop ---------------------------------------------------------------------------
stop_daemon
(( DAEMON_RC == 0 )) || die "annserve exited with status $DAEMON_RC after SIGTERM (expected 0)"
log "annserve stopped cleanly; demo done"
