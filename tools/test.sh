#!/usr/bin/env bash
# Installs mpisplit and runs the whole test suite:
#   1. ruff check and the unit tier (tests/unit: pure logic, in-process, seconds);
#   2. the in-process MPI tier under mpiexec at 2 and 3 ranks (tests/mpi);
#   3. subprocess tests (real mpiexec jobs, real HDF5, a real Slurm cluster).
# Every MPI job has a hard timeout; extra arguments go to the last pytest run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MPISPLIT_VENV:-$root/.venv}
cd "$root"
bash tools/install.sh
py=$venv/bin/python
export OMP_NUM_THREADS=1
"$venv/bin/ruff" check mpisplit tests tools
"$py" -m pytest -q tests/unit
for ranks in 2 3; do
  timeout -k 10 600 "$venv/bin/mpiexec" -n "$ranks" "$py" -m pytest -q --with-mpi tests/mpi
done
"$py" -m pytest -q "$@" --ignore=tests/unit tests
