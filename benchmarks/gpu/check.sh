#!/usr/bin/env bash
# The GPU check in one command (benchmarks/gpu/README.md). From the repository root:
#
#   bash benchmarks/gpu/check.sh             # on the GPU machine; carry .whl and .gpu-data
#   bash benchmarks/gpu/check.sh --dry-run   # on CPU with tiny sizes (what tests/test_gpu_check.py runs)
#
# Results go to $OUT (else runs/gpu-check): gpu_check.json, gpu_check.md, gpu_check.log. Nothing is fetched
# from the network: the dependencies the GPU machine lacks are installed from the carried .whl/ into a
# private folder, and src/ is put on PYTHONPATH (no pip install of the package itself).
# Environment: PYTHON (default python3; the dry run prefers .venv/bin/python), GPU_CHECK_BUDGET (seconds for
# all stages: 300 on the GPU, 600 in the dry run), GPU_CHECK_SITE (where the wheels go, default /tmp/site).
# Every other argument is passed to check.py (--stages, --parallel, --work, --data; see its --help).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-$REPO/runs/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOG="$OUT/gpu_check.log"
: > "$LOG"
log() { echo "$*" | tee -a "$LOG"; }

DRY=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY=1; done
if [ $DRY = 1 ]; then
    DEFAULT_PYTHON=python3
    [ -x "$REPO/.venv/bin/python" ] && DEFAULT_PYTHON="$REPO/.venv/bin/python"
    PYTHON="${PYTHON:-$DEFAULT_PYTHON}"
    BUDGET="${GPU_CHECK_BUDGET:-600}"
    WHEELS="not used (dry run: the local environment)"
    export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
else
    PYTHON="${PYTHON:-python3}"
    BUDGET="${GPU_CHECK_BUDGET:-300}"
    SITE="${GPU_CHECK_SITE:-/tmp/site}"
    shopt -s nullglob
    wheels=(.whl/*.whl)
    shopt -u nullglob
    if [ ${#wheels[@]} -eq 0 ]; then
        WHEELS="none: .whl/ is absent or empty (run benchmarks/gpu/fetch_wheels.sh on the development machine and carry .whl)"
    elif timeout 180 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1; then
        WHEELS="installed ${#wheels[@]} wheels from .whl into $SITE: $(cd .whl && ls *.whl | sed 's/-py3-none-any.whl//; s/-cp3.*//' | tr '\n' ' ')"
    else
        WHEELS="FAILED: pip install of .whl into $SITE (see gpu_check.log)"
    fi
    export PYTHONPATH="$SITE:$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
fi
log "wheels: $WHEELS"
export GPU_CHECK_WHEELS="$WHEELS" GPU_CHECK_BUDGET="$BUDGET" PYTHONUNBUFFERED=1 PYTORCH_NVML_BASED_CUDA_CHECK=1
# No tcmalloc re-exec and no interactive progress bars inside the check's stages.
export MEDPRETRAIN_NO_TCMALLOC=1

# check.py keeps to the budget by itself; this outer limit only catches a driver that hangs. Its SIGTERM
# lets check.py stop the running stages and write what it has.
timeout --signal=TERM --kill-after=20 $((BUDGET + 60)) "$PYTHON" benchmarks/gpu/check.py --out "$OUT" --append-log "$@" \
    2> >(tee -a "$LOG" >&2)
status=$?
if [ ! -s "$OUT/gpu_check.json" ]; then
    log "check.py wrote no gpu_check.json (exit status $status); see $LOG"
    printf '{"schema": 1, "finished": false, "error": "check.py exited with status %s before writing results; see gpu_check.log", "wheels": "%s"}\n' \
        "$status" "${WHEELS//\"/\'}" > "$OUT/gpu_check.json"
fi
[ -s "$OUT/gpu_check.md" ] && cat "$OUT/gpu_check.md"
log "exit status $status; results in $OUT"
exit $status
