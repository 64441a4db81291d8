#!/usr/bin/env bash
# Shared helper of the mpisplit Slurm job scripts (jobscripts/*.sbatch). See README.md.
#
# Sourced by a job script:   . "$MPISPLIT_JOBSCRIPTS/common.sh"   then
#   mpisplit_setup                    threads, paths, launcher choice
#   mpisplit_check_ntasks CFG ARGS..  `mpisplit topology --ntasks` must equal the job's tasks
#   mpisplit_launch [LAUNCH OPTS] -- CMD...
#                                     run CMD as one MPI job over the allocation, forwarding
#                                     the pre-emption signal; returns CMD's status
# Executed per MPI rank (the launch line wraps each rank in it):
#   common.sh task CMD...             MPISPLIT_NODE, GPU binding, threads; then exec CMD
#
# Settings (environment, all optional):
#   MPISPLIT_LAUNCHER   srun | mpiexec (default srun; a heterogeneous job always uses srun)
#   MPISPLIT_SRUN_MPI   srun's --mpi= type (empty: srun's own default, the site's MpiDefault).
#                       Default: chosen by mpisplit_srun_mpi -- pmix when `srun --mpi=list`
#                       offers it and mpi4py's MPI library speaks PMIx (Open MPI, or an MPICH
#                       configured with PMIx), else pmi2 when offered (MPICH, Intel MPI),
#                       else srun's default.
#   MPISPLIT_MPIEXEC    the mpiexec to use (default: mpiexec on PATH)
#   MPISPLIT            how to run the CLI (default: `mpisplit` on PATH, else
#                       `$MPISPLIT_PYTHON -m mpisplit`, MPISPLIT_PYTHON default python3)
#   MPISPLIT_PYTHON     the Python with mpi4py, asked which MPI library it loads (default:
#                       the interpreter of the `mpisplit` entry point, else python3)
#   MPISPLIT_RUNS       base directory for run dirs that the scripts name (default runs)
#   MPISPLIT_GPU_BIND   local (default): a rank that sees several GPUs in CUDA_VISIBLE_DEVICES
#                       keeps the one at index (local rank mod count); none: leave as is
#   MPISPLIT_REQUEUE    1 (default): after the pre-emption signal (USR1) has been forwarded
#                       and the job step has ended unfinished, requeue this job (`scontrol
#                       requeue`); the requeued run resumes from its last checkpoint
#   MPISPLIT_SHM_CLEANUP 1 (default): on a restart, remove our stale /dev/shm/mpich_* segments
#   MPISPLIT_THREADS    threads per rank (OMP_NUM_THREADS, MKL_NUM_THREADS, and torch's
#                       intra-op threads). Default: SLURM_CPUS_PER_TASK -- it wins over an
#                       OMP_NUM_THREADS inherited from the submitting shell -- else that
#                       OMP_NUM_THREADS, else 1

_mpisplit_log() { echo "mpisplit-job: $*" >&2; }
_mpisplit_die() { _mpisplit_log "error: $*"; exit 2; }

# ---------------------------------------------------------------- per-rank wrapper
_mpisplit_task() {
  # Node name of this rank: Slurm's node name (all "nodes" of a test cluster may share a
  # hostname), else the host. The engine records MPISPLIT_NODE in its metrics.
  export MPISPLIT_NODE=${SLURMD_NODENAME:-$(hostname -s)}
  _mpisplit_threads
  # Local rank: srun sets SLURM_LOCALID, hydra MPI_LOCALRANKID, Open MPI its own.
  local lrank=${SLURM_LOCALID:-${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-}}}
  if [ "${MPISPLIT_GPU_BIND:-local}" = local ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ] \
      && [ -n "$lrank" ] && [[ $CUDA_VISIBLE_DEVICES == *,* ]]; then
    local gpus
    IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
    export CUDA_VISIBLE_DEVICES=${gpus[$((lrank % ${#gpus[@]}))]}
  fi
  # srun's pmi2 and hydra set PMI_RANK; srun's pmix PMIX_RANK; SLURM_PROCID is srun's task.
  _mpisplit_log "rank ${PMI_RANK:-${PMIX_RANK:-${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-?}}}}" \
    "on $MPISPLIT_NODE (local ${lrank:-?}): OMP_NUM_THREADS=$OMP_NUM_THREADS" \
    "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
  # A requeued job reuses its job id, so srun's PMI names the ranks' key space
  # "<job>.<step>" again, and MPICH derives its shared-memory segment name from it: a
  # segment left in /dev/shm by the killed first run would be attached to and hang the
  # restart. Remove such stale segments (ours, mapped by no process) first.
  if [ "${SLURM_RESTART_COUNT:-0}" != 0 ] && [ "${SLURM_LOCALID:-}" = 0 ] \
      && [ "${MPISPLIT_SHM_CLEANUP:-1}" = 1 ]; then
    _mpisplit_clean_shm
  fi
  exec "$@"
}

# Threads per rank: MPISPLIT_THREADS, else the job's SLURM_CPUS_PER_TASK (sbatch exports the
# submitter's environment, so an OMP_NUM_THREADS set there must not win over the request),
# else OMP_NUM_THREADS, else 1. The engine passes OMP_NUM_THREADS to torch.set_num_threads.
_mpisplit_threads() {
  local threads=${MPISPLIT_THREADS:-${SLURM_CPUS_PER_TASK:-${OMP_NUM_THREADS:-1}}}
  export OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
}

_mpisplit_clean_shm() {
  local f mapped
  mapped=$(grep -hos '/dev/shm/mpich_[^ ]*' /proc/[0-9]*/maps 2>/dev/null | sort -u)
  for f in /dev/shm/mpich_shm_* /dev/shm/mpich_vci_*; do
    [ -f "$f" ] && [ -O "$f" ] || continue
    printf '%s\n' "$mapped" | grep -qxF "$f" && continue
    rm -f "$f" && echo "mpisplit-job: removed stale $f" >&2
  done
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then   # executed, not sourced
  [ "${1:-}" = task ] || { echo "usage: $0 task CMD..." >&2; exit 2; }
  shift
  _mpisplit_task "$@"
fi

# ---------------------------------------------------------------- job-level helpers
MPISPLIT_JOBSCRIPTS=${MPISPLIT_JOBSCRIPTS:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}

mpisplit_setup() {
  set -o pipefail
  export PYTHONUNBUFFERED=1
  _mpisplit_threads
  if [ -z "${MPISPLIT:-}" ]; then
    if command -v mpisplit >/dev/null 2>&1; then MPISPLIT=$(command -v mpisplit)
    else MPISPLIT="${MPISPLIT_PYTHON:-python3} -m mpisplit"; fi
  fi
  MPISPLIT_RUNS=${MPISPLIT_RUNS:-runs}
  MPISPLIT_LAUNCHER=${MPISPLIT_LAUNCHER:-srun}
  case $MPISPLIT_LAUNCHER in
    srun|mpiexec) ;;
    *) _mpisplit_die "MPISPLIT_LAUNCHER must be srun or mpiexec, not '$MPISPLIT_LAUNCHER'" ;;
  esac
  _mpisplit_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "launcher $MPISPLIT_LAUNCHER, OMP_NUM_THREADS=$OMP_NUM_THREADS, CLI '$MPISPLIT'"
}

# Total tasks of the allocation (all components of a heterogeneous job).
mpisplit_job_ntasks() {
  if [ -n "${SLURM_HET_SIZE:-}" ]; then
    local g n total=0
    for ((g = 0; g < SLURM_HET_SIZE; g++)); do
      n=SLURM_NTASKS_HET_GROUP_$g
      total=$((total + ${!n:-0}))
    done
    echo "$total"
  else
    echo "${SLURM_NTASKS:-${SLURM_NPROCS:-}}"
  fi
}

# mpisplit_check_ntasks CONFIG [overrides...]: fail clearly when the job's task count is not
# what the config's topology needs. Sets MPISPLIT_NTASKS.
mpisplit_check_ntasks() {
  local need have out
  out=$($MPISPLIT topology "$@" --ntasks 2>&1) || _mpisplit_die "cannot read the topology of $*: $out"
  need=$(printf '%s\n' "$out" | tail -n 1)
  [[ $need =~ ^[0-9]+$ ]] || _mpisplit_die "mpisplit topology --ntasks printed '$out'"
  have=$(mpisplit_job_ntasks)
  if [ -z "$have" ]; then
    _mpisplit_die "the config needs $need MPI ranks but this job does not say how many tasks" \
      "it has; submit with --ntasks=$need (or --ntasks-per-node)"
  fi
  if [ "$need" != "$have" ]; then
    _mpisplit_die "ntasks mismatch: config '$1' (with overrides: ${*:2}) needs $need MPI ranks" \
      "(see \`mpisplit topology $1\`), but this job has $have Slurm tasks" \
      "(SLURM_NTASKS); submit with --ntasks=$need or change the config"
  fi
  MPISPLIT_NTASKS=$need
  _mpisplit_log "ntasks check: config needs $need ranks, job has $have"
}

# The Python interpreter that runs the engine (and so has its mpi4py).
_mpisplit_python() {
  if [ -n "${MPISPLIT_PYTHON:-}" ]; then echo "$MPISPLIT_PYTHON"; return 0; fi
  local first=${MPISPLIT%% *} line=
  # An entry point installed by pip starts with "#!<its environment's python>".
  [ -f "$first" ] && IFS= read -r line <"$first"
  if [[ $line =~ ^#!(/[^[:space:]]*python[^[:space:]]*)$ ]]; then echo "${BASH_REMATCH[1]}"
  elif [[ $first == *python* ]]; then echo "$first"
  else echo python3; fi
}

# The MPI library mpi4py loads: MPI.Get_library_version() without MPI_Init (empty if unknown).
mpisplit_mpi_library() {
  "$(_mpisplit_python)" -c 'import mpi4py; mpi4py.rc.initialize = False
from mpi4py import MPI; print(MPI.Get_library_version())' 2>/dev/null
}

# srun's --mpi option (empty: srun's default); logs the choice and why. srun offering a type
# does not mean the MPI library speaks it: Open MPI talks PMIx, MPICH and Intel MPI PMI-1/2
# (PMIx only when built with it), and a listed pmix plugin may not even load.
mpisplit_srun_mpi() {
  local type why
  if [ -n "${MPISPLIT_SRUN_MPI+x}" ]; then
    type=$MPISPLIT_SRUN_MPI why="set by MPISPLIT_SRUN_MPI"
  else
    local offered library name
    offered=$(srun --mpi=list 2>&1 | awk '/^[[:space:]]+[a-z0-9_]+$/ {print $1}' | tr '\n' ' ')
    library=$(mpisplit_mpi_library)
    name=$(printf '%s\n' "$library" | head -n 1 | tr -s ' \t' ' ')
    if [[ " $offered " == *" pmix "* ]] \
        && { [[ $library == *"Open MPI"* ]] || printf '%s' "$library" | grep -Eqi 'with-pmix|with-pmi=pmix'; }; then
      type=pmix why="srun offers: ${offered% }; MPI library '$name' speaks PMIx"
    elif [[ " $offered " == *" pmi2 "* ]]; then
      type=pmi2 why="srun offers: ${offered% }; MPI library '${name:-(could not ask mpi4py)}' is not PMIx-based"
    else
      type= why="srun offers: ${offered% }; no pmi2, and no pmix that the MPI library speaks"
    fi
  fi
  if [ -n "$type" ]; then
    _mpisplit_log "launching with srun --mpi=$type ($why)"
    echo "--mpi=$type"
  else
    _mpisplit_log "launching with srun's default MPI type, no --mpi ($why)"
  fi
}

# Expand SLURM_JOB_NODELIST + SLURM_TASKS_PER_NODE ("2(x2),1") into hydra hostfile lines.
mpisplit_hostfile() {
  local out=$1 hosts counts spec c r i=0 h
  mapfile -t hosts < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
  counts=()
  IFS=, read -r -a spec <<<"${SLURM_TASKS_PER_NODE:-}"
  for c in "${spec[@]}"; do
    if [[ $c =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      for ((r = 0; r < BASH_REMATCH[2]; r++)); do counts+=("${BASH_REMATCH[1]}"); done
    else
      counts+=("$c")
    fi
  done
  : >"$out"
  if [[ ${SLURM_DISTRIBUTION:-} == cyclic* ]]; then
    # One slot per node: hydra wraps around the list, rank r on node r mod #nodes --
    # srun's cyclic distribution. (A host listed twice would count as two nodes.)
    printf '%s:1\n' "${hosts[@]}" >"$out"
    return 0
  fi
  for h in "${hosts[@]}"; do
    echo "$h:${counts[$i]:-1}" >>"$out"
    i=$((i + 1))
  done
}

# mpisplit_launch [srun-only options, e.g. --het-group=0,1] -- CMD...
mpisplit_launch() {
  local opts=() launcher=$MPISPLIT_LAUNCHER
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  local task=("$MPISPLIT_JOBSCRIPTS/common.sh" task)
  if [ -n "${SLURM_HET_SIZE:-}" ] && [ "$launcher" != srun ]; then
    _mpisplit_log "a heterogeneous job launches with srun --het-group (not $launcher)"
    launcher=srun
  fi
  local cmd
  if [ "$launcher" = srun ]; then
    local mpi
    mpi=$(mpisplit_srun_mpi)
    cmd=(srun $mpi --kill-on-bad-exit=1 "${opts[@]}")
    # The batch shell runs in component 0 of a heterogeneous job and holds its GPUs: srun
    # would hand that CUDA_VISIBLE_DEVICES to every rank. Slurm sets it itself for the ranks
    # of components that request GPUs; the others must not inherit component 0's.
    [ -n "${SLURM_HET_SIZE:-}" ] \
      && cmd=(env -u CUDA_VISIBLE_DEVICES -u GPU_DEVICE_ORDINAL -u ROCR_VISIBLE_DEVICES "${cmd[@]}")
    # Each component of a heterogeneous job keeps its own --cpus-per-task (one value here
    # would be component 0's for all); a plain job passes its value on to the step.
    [ -z "${SLURM_HET_SIZE:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ] \
      && cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
  else
    local hostfile=${TMPDIR:-/tmp}/mpisplit-hosts.${SLURM_JOB_ID:-$$}
    mpisplit_hostfile "$hostfile"
    cmd=("${MPISPLIT_MPIEXEC:-mpiexec}" -f "$hostfile" -n "${MPISPLIT_NTASKS:-$(mpisplit_job_ntasks)}")
  fi
  cmd+=("${task[@]}" "$@")
  _mpisplit_log "launch: ${cmd[*]}"

  _MPISPLIT_SIGNALLED=
  "${cmd[@]}" &
  _MPISPLIT_STEP_PID=$!
  _MPISPLIT_STEP_LAUNCHER=$launcher
  trap '_mpisplit_forward USR1' USR1
  trap '_mpisplit_forward TERM' TERM
  local rc
  while kill -0 "$_MPISPLIT_STEP_PID" 2>/dev/null; do
    wait "$_MPISPLIT_STEP_PID" 2>/dev/null
  done
  wait "$_MPISPLIT_STEP_PID" 2>/dev/null
  rc=$?
  trap - USR1 TERM
  if [ "$_MPISPLIT_SIGNALLED" = USR1 ] && [ "$rc" = 0 ]; then
    _mpisplit_log "pre-emption warning (USR1), but the run finished first; not requeued"
  elif [ "$_MPISPLIT_SIGNALLED" = USR1 ] && [ "${MPISPLIT_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    _mpisplit_log "pre-empted (USR1); job step ended with status $rc; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || _mpisplit_log "scontrol requeue failed"
    sleep 30 &   # the requeue ends this script; do not report a status before it does
    wait $!
  fi
  [ "$launcher" = mpiexec ] && rm -f "$hostfile"
  return $rc
}

# Forward a signal the batch shell got (--signal=B:USR1@T, or TERM on requeue/cancel) to the
# launched job step. srun and mpiexec both pass it on to the ranks.
_mpisplit_forward() {
  local sig=$1
  [ -n "$_MPISPLIT_SIGNALLED" ] && [ "$_MPISPLIT_SIGNALLED" = "$sig" ] && return 0
  _MPISPLIT_SIGNALLED=$sig
  _mpisplit_log "got SIG$sig; forwarding it to the job step (pid $_MPISPLIT_STEP_PID, $_MPISPLIT_STEP_LAUNCHER)"
  if [ "$_MPISPLIT_STEP_LAUNCHER" = srun ]; then
    kill -s "$sig" "$_MPISPLIT_STEP_PID" 2>/dev/null || true
  else
    # hydra's proxies run as a job step: signal the steps' processes directly.
    scancel --signal="$sig" "$SLURM_JOB_ID" 2>/dev/null || kill -s "$sig" "$_MPISPLIT_STEP_PID" 2>/dev/null || true
  fi
}

# Resolve CONFIG from the arguments: the first argument if it is a file name (not k=v),
# else the script's default. Sets MPISPLIT_CONFIG and MPISPLIT_ARGS (the overrides).
mpisplit_args() {
  local default=$1
  shift
  if [ $# -gt 0 ] && [[ $1 != *=* ]]; then
    MPISPLIT_CONFIG=$1
    shift
  else
    MPISPLIT_CONFIG=$default
  fi
  MPISPLIT_ARGS=("$@")
  [ -f "$MPISPLIT_CONFIG" ] || _mpisplit_die "config '$MPISPLIT_CONFIG' not found (cwd $(pwd))"
}
