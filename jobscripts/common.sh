#!/usr/bin/env bash
# Shared helper of the mpisplit Slurm job scripts (jobscripts/*.sbatch). See README.md.
#
# Sourced by a job script:   . "$MPISPLIT_JOBSCRIPTS/common.sh"   (which from then on traps
# the pre-emption signal USR1 and TERM), then
#   mpisplit_setup "$@"               threads, paths, launcher choice; keeps the arguments
#   mpisplit_args CFG "$@"            the script's arguments: [--resume] [CONFIG] overrides
#   mpisplit_check_ntasks CFG ARGS..  `mpisplit topology --ntasks` must equal the job's tasks
#   mpisplit_launch [LAUNCH OPTS] -- CMD...
#                                     run CMD as one MPI job over the allocation through
#                                     `mpisplit launch [LAUNCH OPTS]` (e.g. --het-group=0,1),
#                                     forwarding the pre-emption signal; then requeue, or say
#                                     how to continue from a checkpoint; returns CMD's status
# Executed per MPI rank (the launch line wraps each rank in it):
#   common.sh task CMD...             MPISPLIT_NODE, GPU binding, threads; then exec CMD
#
# Script arguments: `--resume` continues the run in the given run dir (run.dir=...) from its
# newest committed checkpoint (`mpisplit train --resume`); a run that ends unfinished and not
# requeued, with a committed checkpoint, prints the exact sbatch command that does this.
#
# Settings (environment, all optional):
#   MPISPLIT_LAUNCHER   srun | mpiexec (default srun; a heterogeneous job always uses srun)
#   MPISPLIT_SRUN_MPI   srun's --mpi= type (empty: srun's own default, the site's MpiDefault).
#                       Default: chosen by `mpisplit launch` -- pmix when `srun --mpi=list`
#                       offers it and mpi4py's MPI library speaks PMIx (Open MPI, or an MPICH
#                       configured with PMIx), else pmi2 when offered (MPICH, Intel MPI),
#                       else srun's default.
#   MPISPLIT_MPIEXEC    the mpiexec to use (default: the one beside mpisplit's Python, else
#                       mpiexec on PATH)
#   MPISPLIT            how to run the CLI (default: `mpisplit` on PATH -- activate the venv
#                       before sbatch, which passes PATH on -- else `$MPISPLIT_PYTHON -m
#                       mpisplit` when that Python has mpisplit, MPISPLIT_PYTHON default
#                       python3; else the job stops at once saying so)
#   MPISPLIT_PYTHON     the Python that reads the config for the run's paths (default: the
#                       interpreter of the `mpisplit` entry point, else python3)
#   MPISPLIT_RUNS       base directory for run dirs that the scripts name (default runs)
#   MPISPLIT_GPU_BIND   local (default): a rank that sees several GPUs in CUDA_VISIBLE_DEVICES
#                       keeps the one at index (local rank mod count); none: leave as is.
#                       The local rank comes from the launcher that started the rank: srun's
#                       SLURM_LOCALID, hydra's MPI_LOCALRANKID, Open MPI's; where none is
#                       known the list stays and the engine picks by its node-local MPI rank
#   MPISPLIT_REQUEUE    1 (default): after the pre-emption signal (USR1) -- also one that
#                       comes during start-up, before the launch -- and a job step that ended
#                       unfinished, requeue this job (`scontrol requeue`; Slurm holds it
#                       ~2 minutes, BeginTime); the requeued run resumes from its last
#                       checkpoint. A run that wrote its final summary is never requeued
#   MPISPLIT_SHM_CLEANUP 1 (default): on a restart, remove this job step's stale MPICH
#                       shared-memory segments (/dev/shm/mpich_{shm,vci}_<hash of job.step>_*)
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
  # Local rank, from the launcher that started this process: hydra's MPI_LOCALRANKID or
  # Open MPI's, else (srun) SLURM_LOCALID. Ranks of an mpiexec inherit SLURM_LOCALID=0 from
  # the proxy that srun started on their node, so under mpiexec it is never theirs.
  local lrank=${MPI_LOCALRANKID:-${OMPI_COMM_WORLD_LOCAL_RANK:-}}
  [ -z "$lrank" ] && [ "${MPISPLIT_LAUNCHER:-srun}" = srun ] && lrank=${SLURM_LOCALID:-}
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
  # "<job>.<step>" again, and MPICH names its shared-memory segments after a hash of it: a
  # segment left in /dev/shm by the killed first run would be attached to and hang the
  # restart. Remove this step's stale segments (mapped by no process) first.
  if [ "${SLURM_RESTART_COUNT:-0}" != 0 ] && [ "$lrank" = 0 ] \
      && [ "${MPISPLIT_SHM_CLEANUP:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    _mpisplit_clean_shm "$SLURM_JOB_ID.${SLURM_STEP_ID:-${SLURM_STEPID:-0}}"
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

# MPICH's name for the segments of a job step: mpich_{shm,vci}_<FNV-1a hash of the PMI key
# space name, "<job>.<step>" under srun, in hex>_<node index> (MPIDI_POSIX_init_vci).
_mpisplit_shm_hash() {
  local name=$1 hash=2166136261 i c
  for ((i = 0; i < ${#name}; i++)); do
    printf -v c '%d' "'${name:i:1}"
    hash=$(( ((hash ^ c) * 16777619) & 0xFFFFFFFF ))
  done
  printf '%x' "$hash"
}

# Removes the stale segments of job step $1 ("<job>.<step>") -- this job's alone, never
# those of other jobs on a shared node -- that no process maps.
_mpisplit_clean_shm() {
  local f mapped hash
  hash=$(_mpisplit_shm_hash "$1")
  mapped=$(grep -hos '/dev/shm/mpich_[^ ]*' /proc/[0-9]*/maps 2>/dev/null | sort -u)
  for f in /dev/shm/mpich_shm_"$hash"_* /dev/shm/mpich_vci_"$hash"_*; do
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

# The batch shell handles the pre-emption signal (--signal=B:USR1@T) and TERM (scancel,
# requeue) from here on: before the launch it ends (USR1: requeued) saying so, once the job
# step runs it forwards them (mpisplit_launch). Start-up commands run in the background
# (_mpisplit_wait), because bash runs a trap only once a foreground command has ended.
_MPISPLIT_SIGNALLED= _MPISPLIT_STEP_PID=
trap '_mpisplit_on_signal USR1' USR1
trap '_mpisplit_on_signal TERM' TERM

_mpisplit_on_signal() {
  local sig=$1
  if [ -n "$_MPISPLIT_STEP_PID" ]; then _mpisplit_forward "$sig"; return 0; fi
  _mpisplit_log "got SIG$sig during start-up, before the launch"
  [ "$sig" = USR1 ] && _mpisplit_requeue "nothing ran yet"
  exit $((128 + $(kill -l "$sig")))
}

# Waits for background process $1, running traps at once; returns its exit status.
_mpisplit_wait() {
  while kill -0 "$1" 2>/dev/null; do wait "$1" 2>/dev/null; done
  wait "$1" 2>/dev/null
}

# Requeues this job (unless MPISPLIT_REQUEUE=0 or not in a job) and waits for Slurm to end
# this run of the script; returns 1 when it does not requeue. $*: what the log line adds.
_mpisplit_requeue() {
  [ "${MPISPLIT_REQUEUE:-1}" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ] || return 1
  _mpisplit_log "requeueing job $SLURM_JOB_ID ($*); Slurm holds it about 2 minutes" \
    "(BeginTime) before it runs again"
  scontrol requeue "$SLURM_JOB_ID" || { _mpisplit_log "scontrol requeue failed"; return 1; }
  trap - USR1 TERM   # the requeue ends this script with TERM; report no status before
  sleep 60 &
  wait $!
}

# mpisplit_setup "$@" (the script's arguments, kept for the command that continues a run).
mpisplit_setup() {
  MPISPLIT_SCRIPT_ARGS=("$@")
  set -o pipefail
  export PYTHONUNBUFFERED=1
  _mpisplit_threads
  if [ -z "${MPISPLIT:-}" ]; then
    if command -v mpisplit >/dev/null 2>&1; then MPISPLIT=$(command -v mpisplit)
    elif _mpisplit_has_mpisplit "${MPISPLIT_PYTHON:-python3}"; then
      MPISPLIT="${MPISPLIT_PYTHON:-python3} -m mpisplit"
    else
      _mpisplit_die "mpisplit is not on PATH in this job, and ${MPISPLIT_PYTHON:-python3} lacks" \
        "mpisplit or its dependencies: activate its venv before sbatch (. .venv/bin/activate;" \
        "sbatch passes PATH on), or set MPISPLIT=/path/to/.venv/bin/mpisplit"
    fi
  fi
  MPISPLIT_RUNS=${MPISPLIT_RUNS:-runs}
  MPISPLIT_LAUNCHER=${MPISPLIT_LAUNCHER:-srun}
  case $MPISPLIT_LAUNCHER in
    srun|mpiexec) ;;
    *) _mpisplit_die "MPISPLIT_LAUNCHER must be srun or mpiexec, not '$MPISPLIT_LAUNCHER'" ;;
  esac
  _mpisplit_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on $(_mpisplit_nodes):" \
    "launcher $MPISPLIT_LAUNCHER, OMP_NUM_THREADS=$OMP_NUM_THREADS, CLI '$MPISPLIT'"
}

# Whether Python $1 can import mpisplit and what it needs (found, not imported: fast).
_mpisplit_has_mpisplit() {
  "$1" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("mpisplit", "mpi4py", "h5py", "torch", "yaml")))' \
    2>/dev/null
}

# The job's nodes; every component's of a heterogeneous job ("g1 + n[1-3]").
_mpisplit_nodes() {
  if [ -z "${SLURM_HET_SIZE:-}" ]; then echo "${SLURM_JOB_NODELIST:-?}"; return 0; fi
  local g n nodes=
  for ((g = 0; g < SLURM_HET_SIZE; g++)); do
    n=SLURM_JOB_NODELIST_HET_GROUP_$g
    nodes+="${nodes:+ + }${!n:-?}"
  done
  echo "$nodes"
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
  local need have out file=${TMPDIR:-/tmp}/mpisplit-topology.${SLURM_JOB_ID:-$$}
  $MPISPLIT topology "$@" --ntasks >"$file" 2>&1 &
  _mpisplit_wait $!
  local rc=$?
  out=$(<"$file")
  rm -f "$file"
  [ "$rc" = 0 ] || _mpisplit_die "cannot read the topology of $*: $out"
  need=$(printf '%s\n' "$out" | tail -n 1)
  [[ $need =~ ^[0-9]+$ ]] || _mpisplit_die "mpisplit topology --ntasks printed '$out'"
  have=$(mpisplit_job_ntasks)
  if [ -z "$have" ]; then
    _mpisplit_die "the config needs $need MPI ranks but this job does not say how many tasks" \
      "it has; submit with --ntasks=$need (or --ntasks-per-node)"
  fi
  if [ "$need" != "$have" ]; then
    _mpisplit_die "ntasks mismatch: config '$1' (with overrides: ${*:2}) needs $need MPI ranks" \
      "(see \`mpisplit topology$(printf ' %q' "$@")\`), but this job has $have Slurm tasks" \
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

# mpisplit_launch [`mpisplit launch` options, e.g. --het-group=0,1] -- CMD...
# `mpisplit launch` (mpisplit/launch.py) builds the launch line: srun with the --mpi plugin
# of the MPI library mpi4py loads, or mpiexec placing ranks on the allocation's nodes.
mpisplit_launch() {
  local opts=() launcher=$MPISPLIT_LAUNCHER
  while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  if [ -n "${SLURM_HET_SIZE:-}" ] && [ "$launcher" != srun ]; then
    _mpisplit_log "a heterogeneous job launches with srun --het-group (not $launcher)"
    launcher=srun
  fi
  local cmd=($MPISPLIT launch --verbose --launcher "$launcher" "${opts[@]}")
  [ "$launcher" = mpiexec ] && cmd+=(-n "${MPISPLIT_NTASKS:-$(mpisplit_job_ntasks)}")
  cmd+=(-- "$MPISPLIT_JOBSCRIPTS/common.sh" task "$@")
  export MPISPLIT_LAUNCHER=$launcher  # the ranks' wrapper: which launcher started them
  local paths started
  paths=$(_mpisplit_run_paths "$@")
  started=$(date +%s)
  # `mpisplit launch` replaces itself with srun or mpiexec: the signals forwarded to this
  # pid reach the launcher.
  "${cmd[@]}" &
  _MPISPLIT_STEP_PID=$!
  _MPISPLIT_STEP_LAUNCHER=$launcher
  _mpisplit_wait "$_MPISPLIT_STEP_PID"
  local rc=$?
  _mpisplit_after_step "$rc" "$started" "${paths%%$'\n'*}" "${paths#*$'\n'}"
  return $rc
}

# _mpisplit_after_step STATUS STARTED RUN_DIR CHECKPOINT_DIR: after the job step. A run that
# wrote its final summary is never requeued; one pre-empted (USR1) unfinished is; any other
# that stopped with a committed checkpoint gets the command that continues from it.
_mpisplit_after_step() {
  local rc=$1 started=$2 run_dir=$3 checkpoints=$4 step=
  if [ "$rc" = 0 ]; then
    [ "$_MPISPLIT_SIGNALLED" = USR1 ] \
      && _mpisplit_log "pre-emption warning (USR1), but the run finished first; not requeued"
    return 0
  fi
  if [ -n "$run_dir" ] && _mpisplit_finished "$run_dir/summary.json" "$started"; then
    _mpisplit_log "the job step ended with status $rc after the run had finished" \
      "($run_dir/summary.json written); not requeued"
    return 0
  fi
  [ -n "$checkpoints" ] && step=$(_mpisplit_committed "$checkpoints")
  if [ "$_MPISPLIT_SIGNALLED" = USR1 ]; then
    _mpisplit_log "pre-empted (USR1); the job step ended with status $rc"
    local next="no committed checkpoint: it starts over"
    [ -n "$step" ] && next="it resumes from the checkpoint at step $step"
    _mpisplit_requeue "$next" && return 0
  fi
  [ -n "$step" ] && _mpisplit_log "to continue from the checkpoint at step $step:" \
    "$(_mpisplit_continue_command "$run_dir")"
  return 0
}

# Whether summary file $1 is a final one (not marked preempted) written since time $2.
_mpisplit_finished() {
  [ -f "$1" ] && [ "$(stat -c %Y "$1")" -ge "$2" ] && ! grep -q '"preempted": true' "$1"
}

# The step of the newest committed checkpoint in directory $1 (nothing when there is none).
_mpisplit_committed() {
  local newest
  newest=$(ls -d "$1"/step-*/COMMITTED 2>/dev/null | sort | tail -n 1)
  [ -n "$newest" ] || return 0
  newest=${newest%/COMMITTED}
  echo $((10#${newest##*/step-}))
}

# The run dir and checkpoint dir (two lines) of the `mpisplit train` in command "$@"; nothing
# for another command or a config the engine will refuse anyway.
_mpisplit_run_paths() {
  while [ $# -gt 0 ] && [ "$1" != train ]; do shift; done
  [ $# -gt 0 ] || return 0
  shift
  while [ $# -gt 0 ] && [[ $1 == --* ]]; do shift; done
  # checkpoint.dir's default as in mpisplit.checkpoint.checkpoint_dir (which needs torch)
  "$(_mpisplit_python)" -c 'import sys
from mpisplit.config import load_config
cfg = load_config(sys.argv[1], sys.argv[2:])
print(cfg.run.dir, cfg.checkpoint.dir or f"{cfg.run.dir}/checkpoints", sep="\n")' "$@" 2>/dev/null
}

# The sbatch command, run from the submit dir, that continues this job's run in RUN_DIR ($1)
# from its checkpoint: the same script, node and task counts, and arguments, with --resume.
_mpisplit_continue_command() {
  local script opts=() args=() arg
  script=$(_mpisplit_job_script)
  if [ -z "${SLURM_HET_SIZE:-}" ]; then
    opts+=(--nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks="$(mpisplit_job_ntasks)")
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && opts+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    [ -n "${SLURM_JOB_PARTITION:-}" ] && opts+=(--partition="$SLURM_JOB_PARTITION")
  fi
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && opts+=(--array="$SLURM_ARRAY_TASK_ID")
  for arg in "${MPISPLIT_SCRIPT_ARGS[@]}"; do
    [[ $arg == --resume || $arg == run.dir=* ]] || args+=("$arg")
  done
  printf 'cd %q && sbatch' "${SLURM_SUBMIT_DIR:-$(pwd)}"
  printf ' %q' "${opts[@]}" "$script" --resume "${args[@]}" "run.dir=$1"
}

# This job's script as submitted (scontrol's Command, less the arguments), relative to the
# submit dir when it lies below it.
_mpisplit_job_script() {
  local command
  command=$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)
  [ ${#MPISPLIT_SCRIPT_ARGS[@]} -gt 0 ] && command=${command% "${MPISPLIT_SCRIPT_ARGS[*]}"}
  command=${command#"${SLURM_SUBMIT_DIR:-}"/}
  echo "${command:-JOBSCRIPT}"
}

# Forward a signal the batch shell got (--signal=B:USR1@T, or TERM on requeue/cancel) to the
# launched job step. srun and mpiexec both pass it on to the ranks; a rank that has finished
# training ignores it (it only reports and exits).
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

# mpisplit_args DEFAULT_CONFIG [--resume] [CONFIG] [section.key=value ...]: CONFIG is the
# first argument that is a file name (not k=v), else the script's default. Sets
# MPISPLIT_CONFIG, MPISPLIT_ARGS (the overrides) and MPISPLIT_TRAIN_OPTS (--resume or none).
mpisplit_args() {
  local default=$1 arg rest=()
  shift
  MPISPLIT_TRAIN_OPTS=()
  for arg in "$@"; do
    case $arg in
      --resume) MPISPLIT_TRAIN_OPTS=(--resume) ;;
      -*) _mpisplit_die "unknown option '$arg': the scripts take [--resume] [CONFIG.yaml]" \
            "[section.key=value ...]" ;;
      *) rest+=("$arg") ;;
    esac
  done
  set -- "${rest[@]}"
  if [ $# -gt 0 ] && [[ $1 != *=* ]]; then
    MPISPLIT_CONFIG=$1
    shift
  else
    MPISPLIT_CONFIG=$default
  fi
  MPISPLIT_ARGS=("$@")
  [ -f "$MPISPLIT_CONFIG" ] || _mpisplit_die "config '$MPISPLIT_CONFIG' not found (cwd $(pwd))"
}
