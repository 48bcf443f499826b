#!/usr/bin/env bash
# Download the wheels the GPU check carries (benchmarks/gpu/wheels.txt) into .whl/ (git-ignored), for the GPU
# machine's Python 3.12 on x86-64, following /work/.library/device/README.md: binary wheels only, --no-deps
# (wheels.txt names every missing requirement itself), one version of each.
#
#   bash benchmarks/gpu/fetch_wheels.sh            # versions as installed in .venv (what the tests ran with)
#   PYTHON=python3 WHEEL_DIR=/tmp/w bash benchmarks/gpu/fetch_wheels.sh
#
# Run from anywhere; needs the network (a package index) once. The folder is replaced each time, so no stale
# second version of a distribution can stop the install on the GPU machine.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
WHEEL_DIR="${WHEEL_DIR:-$REPO/.whl}"
LIST="$REPO/benchmarks/gpu/wheels.txt"

if [ ! -x "$PYTHON" ] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: $PYTHON not found; set PYTHON to the interpreter whose installed versions the wheels should match" >&2
    exit 1
fi

# Resolve every line of wheels.txt to NAME==VERSION (bare names: the version installed in $PYTHON).
mapfile -t SPECS < <("$PYTHON" - "$LIST" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version

for line in open(sys.argv[1], encoding="utf-8"):
    name = line.split("#", 1)[0].strip()
    if not name:
        continue
    if "==" in name:
        print(name)
        continue
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        sys.exit(f"error: {name} (in {sys.argv[1]}) is not installed in {sys.executable}; install it there "
                 f"or pin it as {name}==VERSION in that file")
PY
)

rm -rf "$WHEEL_DIR"
mkdir -p "$WHEEL_DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$WHEEL_DIR" "${SPECS[@]}"

echo "downloaded ${#SPECS[@]} wheels into $WHEEL_DIR ($(du -sh "$WHEEL_DIR" | cut -f1)):"
ls -1 "$WHEEL_DIR"
