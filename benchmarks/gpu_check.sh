#!/usr/bin/env bash
# GPU delivery check (issue 15), for a machine with a CUDA GPU; finishes in < 8 min.
#
#   bash benchmarks/gpu_check.sh            # install, gpu tests, 100k x 20k atlas, table
#   DRY=1 bash benchmarks/gpu_check.sh      # the same on the CPU, tiny atlas (no GPU)
#
# 1. installs what it needs, quickly: a venv ($VENV, default .venv-gpu) with a CUDA torch
#    ($TORCH_SPEC from $TORCH_INDEX) and the project with the client,server,test,gpu
#    extras (cupy-cuda12x); skipped when that venv already sees CUDA. Offline machines:
#    PIP_FIND_LINKS=/path/to/wheelhouse PIP_NO_INDEX=1 (pip reads both).
# 2. runs the gpu-marked tests (pytest -m gpu).
# 3. builds a 100k x 20k atlas (make_atlas.py, ~1,500 nnz/cell) and its annserve store
#    (annserve convert --compression none), in $WORK.
# 4. times one epoch per row (benchmarks/gpu_check.py run; medians of 3): CSR built on
#    the GPU (device-csr), CuPy matrices (device-cupy), the CPU path + .to("cuda")
#    (cpu-then-to), over TCP and over shared memory; then annbatch's
#    Loader(preload_to_gpu=True) on its own collection of the same atlas, if python3.12
#    and annbatch install within the budget.
# Prints cells/s, H2D bytes/cell, host CPU us/cell and peak GPU memory; the table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$SECONDS
BUDGET_S=${BUDGET_S:-470}  # the whole script, seconds
WORK=${WORK:-/tmp/annserve-gpu-check}
VENV=${VENV:-.venv-gpu}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cu126}
ANNBATCH_SPEC=${ANNBATCH_SPEC:-annbatch==0.3.1}
DRY=${DRY:-0}
if [[ $DRY == 1 ]]; then
    DEVICE=cpu N_OBS=${N_OBS:-6000} N_VARS=${N_VARS:-2000} NNZ=${NNZ:-300} REPS=${REPS:-1}
    VENV=${VENV_DRY:-.venv}
else
    DEVICE=${DEVICE:-cuda} N_OBS=${N_OBS:-100000} N_VARS=${N_VARS:-20000} NNZ=${NNZ:-1500}
    REPS=${REPS:-3}
fi
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
: >"$RESULTS"

left() { echo $((BUDGET_S - (SECONDS - START))); }
step() {  # step LIMIT_S NAME CMD...: run CMD within min(LIMIT_S, what is left)
    local limit=$1 name=$2
    shift 2
    local t=$(($(left) < limit ? $(left) : limit))
    if ((t < 5)); then
        echo "== $name: skipped (budget spent)"
        return 124
    fi
    echo "== $name (at most ${t}s)"
    timeout "$t" "$@"
    local rc=$?
    ((rc == 0)) || echo "== $name: exit $rc"
    return $rc
}
unavailable() {  # unavailable ROW WHY: a table row saying why a row could not run
    printf '{"row": "%s", "device": "unavailable: %s"}\n' "$1" "$2" >>"$RESULTS"
}

# 1. install
PY=$VENV/bin/python
if [[ $DRY != 1 ]] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    [[ -x $PY ]] || python3.11 -m venv "$VENV" || python3 -m venv "$VENV"
    step 200 "install CUDA torch" "$PY" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX"
    step 120 "install annserve[client,server,test,gpu]" "$PY" -m pip install --quiet -e ".[client,server,test,gpu]"
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'

# 2. gpu-marked tests
if [[ $DRY != 1 ]]; then
    step 150 "pytest -m gpu" "$PY" -m pytest -m gpu tests/client -q -p no:cacheprovider
fi

# 3. atlas and store
ATLAS=$WORK/atlas-$N_OBS-$N_VARS.zarr
STORE=$WORK/store-$N_OBS-$N_VARS.zarr
if [[ ! -d $STORE ]]; then
    rm -rf "$ATLAS"
    step 150 "make_atlas $N_OBS x $N_VARS" "$PY" benchmarks/make_atlas.py --out "$ATLAS" \
        --n-obs "$N_OBS" --n-vars "$N_VARS" --nnz-per-cell "$NNZ" --codec none >/dev/null
    step 100 "annserve convert" "$PY" -m annserve.server.rpc.cli convert "$ATLAS" -o "$STORE" \
        --compression none >/dev/null
fi

# 4. rows
for transport in tcp shm; do
    step 90 "annserve rows ($transport)" "$PY" benchmarks/gpu_check.py run --store "$STORE" \
        --device "$DEVICE" --transport "$transport" --reps "$REPS" | tee -a "$RESULTS" ||
        unavailable "annserve rows ($transport)" "failed or out of time"
done
if [[ $DRY == 1 ]]; then
    unavailable annbatch-preload_to_gpu "dry mode (no GPU)"
elif command -v python3.12 >/dev/null; then
    AB=${AB_VENV:-.venv-annbatch-gpu}
    [[ -x $AB/bin/python ]] || python3.12 -m venv "$AB"
    COLL=$WORK/annbatch-$N_OBS-$N_VARS
    if step 120 "install $ANNBATCH_SPEC" "$AB/bin/python" -m pip install --quiet "$ANNBATCH_SPEC" zarrs cupy-cuda12x \
        && step 100 "install CUDA torch (annbatch env)" "$AB/bin/python" -m pip install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX" \
        && { [[ -d $COLL ]] || step 90 "annbatch collection" "$AB/bin/python" benchmarks/annbatch_worker.py prepare \
            --store "$ATLAS" --collection "$COLL" --compressor none >/dev/null; } \
        && step 60 "annbatch preload_to_gpu" "$AB/bin/python" benchmarks/gpu_check.py annbatch \
            --collection "$COLL" | tee -a "$RESULTS"; then
        :
    else
        unavailable annbatch-preload_to_gpu "install, collection or run failed (see above)"
    fi
else
    unavailable annbatch-preload_to_gpu "no python3.12 (annbatch 0.3.1 needs it)"
fi

echo "== $((SECONDS - START)) s; results in $RESULTS"
"$PY" benchmarks/gpu_check.py table "$RESULTS"
