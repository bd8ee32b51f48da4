# slurm/common.sh: what every t2i sbatch script shares. Sourced from the repository root:
#     source "${T2I_ROOT:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
# (sbatch runs a copy of the script from its spool folder, so `dirname $0` is not the repository).
#
# Cluster hooks, all optional, set in the environment of `sbatch` (it exports it) or edited here:
#   T2I_ROOT          repository checkout (default: the directory sbatch was called from)
#   T2I_MODULES       "module load" list, e.g. "cuda/12.4 nccl"
#   T2I_ENV_HOOK      a file to source before anything runs (proxy settings, conda activate, NCCL_* ...)
#   T2I_VENV          virtual environment (default: $T2I_ROOT/.venv, what `make setup` creates)
#   T2I_MAX_RESTARTS  self-requeues allowed before a job gives up (default 50)

T2I_ROOT=${T2I_ROOT:-$SLURM_SUBMIT_DIR}
T2I_REQUEUE_EXIT=99          # the ranks checkpointed because they were asked to (t2i/train/preemption.py)
T2I_MAX_RESTARTS=${T2I_MAX_RESTARTS:-50}

t2i_log() { echo "== $(date +%T) [job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*"; }

t2i_setup() {
  cd "$T2I_ROOT" || exit 1
  if [ -n "${T2I_MODULES:-}" ]; then module load $T2I_MODULES; fi
  if [ -n "${T2I_ENV_HOOK:-}" ]; then source "$T2I_ENV_HOOK"; fi
  source "${T2I_VENV:-$T2I_ROOT/.venv}/bin/activate"
  # rank 0's node hosts the rendezvous (env://); the port is derived from the job id so two jobs
  # sharing a node do not collide
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export MASTER_ADDR
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  t2i_log "start on ${SLURM_JOB_NODELIST}: ${SLURM_NTASKS:-1} task(s), master ${MASTER_ADDR}:${MASTER_PORT}"
}

# Signals to the batch shell: the time-limit warning (#SBATCH --signal=B:USR1@N) and the TERM that
# scontrol requeue, scancel and preemption send. bash runs a trap only between commands, so the job
# step runs in the background and the shell waits for it.
_T2I_SIGNAL=""
_T2I_SRUN=""
_t2i_on_signal() {
  if [ -n "$_T2I_SIGNAL" ]; then return; fi     # after a self-requeue Slurm sends TERM here too
  _T2I_SIGNAL=$1
  t2i_log "batch shell got SIG$1: asking the ranks to checkpoint"
  # USR1, never TERM: srun turns a TERM into an immediate SIGKILL of every task; USR1 is forwarded
  if [ -n "$_T2I_SRUN" ]; then kill -USR1 "$_T2I_SRUN" 2>/dev/null; fi
}

trap '_t2i_on_signal USR1' USR1   # from the moment this file is sourced
trap '_t2i_on_signal TERM' TERM

t2i_requeue() {
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$T2I_MAX_RESTARTS" ]; then
    t2i_log "not requeueing: already restarted ${SLURM_RESTART_COUNT} times (T2I_MAX_RESTARTS)"; return 1
  fi
  # a TIMEOUT is never requeued by Slurm, so the job requeues itself before its limit; after an
  # external requeue or a preemption Slurm already does, and this call fails harmlessly. Logged first:
  # a requeue that succeeds cancels this script at once (a line after it was lost when it won the race)
  t2i_log "requeueing job $SLURM_JOB_ID (scontrol requeue)"
  scontrol requeue "$SLURM_JOB_ID" 2>/dev/null || t2i_log "scontrol requeue refused (already requeued by Slurm?)"
  return 0
}

# t2i_run <command ...>: one task per rank (srun); RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_WORLD_SIZE from
# SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS/SLURM_NTASKS_PER_NODE. If the ranks checkpointed on a signal
# (exit 99), or the time-limit warning arrived, the job requeues itself and resumes from `latest`
# (--auto-resume) when it restarts.
t2i_run() {
  if [ "$_T2I_SIGNAL" = USR1 ]; then t2i_requeue; exit 0; fi   # warned before anything started
  # --kill-on-bad-exit=0 + --wait: ranks leaving with 99 a few ms apart are not killed by srun (which
  # would turn a clean exit 99 into 143); a crashed rank's peers are ended 60 s after it
  # Slurm 22.05-23.02 does not pass the job's --cpus-per-task on to srun: without this each rank
  # (and its data-loader workers) would get one core.
  if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
  srun --kill-on-bad-exit=0 --wait=60 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} bash -c \
    'export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS \
            LOCAL_WORLD_SIZE=${SLURM_NTASKS_PER_NODE:-1}; exec "$@"' t2i "$@" &
  _T2I_SRUN=$!
  local rc
  while :; do
    wait "$_T2I_SRUN"; rc=$?
    kill -0 "$_T2I_SRUN" 2>/dev/null || break    # wait returned early for a trapped signal
  done
  t2i_log "ranks exited with $rc"
  if [ "$rc" = "$T2I_REQUEUE_EXIT" ] || { [ "$rc" != 0 ] && [ "$_T2I_SIGNAL" = USR1 ]; }; then
    t2i_requeue && exit 0
  fi
  return "$rc"
}
