#!/usr/bin/env bash
# Installs a single-machine Slurm test cluster's packages (Debian/Ubuntu, as root).
#
#   tools/slurm/install.sh        # idempotent: returns at once when all is there
#
# Packages: slurmctld slurmd slurm-client munge. Debian's slurm-wlm plugins include
# mpi/pmix (built against libpmix2) when that library is present; we ask for it too
# so that `srun --mpi=pmix` is at least offered, but nothing requires it to work.
# Exit status: 0 installed/present; 3 cannot install (not root, no apt-get, or apt
# failed) -- callers (tests/slurm/conftest.py) turn 3 into a skip.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(slurmctld slurmd slurm-client munge)
bins=(slurmctld slurmd sbatch srun scontrol sinfo squeue munged mungekey)

have_all() {
  local b
  for b in "${bins[@]}"; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || return 1
  done
}

if have_all; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "tools/slurm/install.sh: no apt-get here; install Slurm (${pkgs[*]}) by other means" >&2
  exit 3
fi
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    exec sudo -n env DEBIAN_FRONTEND=noninteractive "$0" "$@"
  fi
  echo "tools/slurm/install.sh: need root (or passwordless sudo) to apt-get install ${pkgs[*]}" >&2
  exit 3
fi

# Keep the packages' own services from starting (we run our own daemons): a
# policy-rc.d that forbids starts during this install only.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  made_policy=1
fi
cleanup() { [ "$made_policy" = 1 ] && rm -f "$policy"; return 0; }
trap cleanup EXIT

apt_get() { apt-get -q -y -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"; }
if ! apt_get install --no-install-recommends "${pkgs[@]}" >/tmp/mpisplit-slurm-apt.log 2>&1; then
  # Stale package lists are the usual cause on a fresh machine.
  if ! { apt_get update && apt_get install --no-install-recommends "${pkgs[@]}"; } \
      >>/tmp/mpisplit-slurm-apt.log 2>&1; then
    echo "tools/slurm/install.sh: apt-get install ${pkgs[*]} failed; see /tmp/mpisplit-slurm-apt.log" >&2
    tail -n 20 /tmp/mpisplit-slurm-apt.log >&2 || true
    exit 3
  fi
fi
# Best effort: PMIx support for srun --mpi=pmix (not required).
apt_get install --no-install-recommends libpmix2 >>/tmp/mpisplit-slurm-apt.log 2>&1 || true

if ! have_all; then
  echo "tools/slurm/install.sh: packages installed but some of ${bins[*]} are missing" >&2
  exit 3
fi
echo "tools/slurm/install.sh: installed ${pkgs[*]}"
