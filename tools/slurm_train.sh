#!/usr/bin/env bash
#SBATCH --job-name=scalekd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
#
# SLURM example: one torchrun launcher per node (srun, one task per node), each starting
# GPUS_PER_NODE workers through ./distributed_train.sh. Submit from the repository root:
#
#   sbatch tools/slurm_train.sh --config recipes/swinl_r50.yaml --data-dir /data/imagenet \
#       --output /checkpoints --experiment swinl_r50
#   sbatch --nodes=1 tools/slurm_train.sh --config ...          # 1 x 8 GPUs
#
# Give a fixed --experiment: a requeued job must find its run folder again. --resume auto is
# added, so the first start begins a new run and every later start continues the newest valid
# checkpoint of that folder.
#
# SLURM -> torchrun:  SLURM_NNODES -> NNODES,  SLURM_NODEID -> NODE_RANK (per task),
#                     first host of SLURM_JOB_NODELIST -> MASTER_ADDR.
#
# Time limit / preemption: --signal=B:USR1@300 sends USR1 to this batch shell 5 minutes before the
# time limit. The trap below passes SIGTERM to srun, srun to each launcher, torchrun to the
# workers: they finish their step, rank 0 writes a recovery checkpoint, they exit (code 75), and
# this script requeues the job (scontrol requeue). A preemption that SLURM itself requeues
# (PreemptMode=REQUEUE) sends SIGTERM, which takes the same path.
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), MASTER_PORT (default 29500),
# REPO (default: the submit directory), SHUTDOWN_TIMEOUT (seconds torchrun waits for the
# workers to save after a stop signal, default 240; keep it below the --signal lead time).
set -uo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$REPO"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?run this script with sbatch}" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-29500}
export SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}

echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${NNODES} node(s) x ${GPUS_PER_NODE} GPUs," \
     "head ${MASTER_ADDR}:${MASTER_PORT}"

# NODE_RANK must come from each task's own SLURM_NODEID, hence the single quotes
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec ./distributed_train.sh "$0" "$@"' \
  "$GPUS_PER_NODE" "$@" --resume auto &
SRUN_PID=$!

STOPPED=''
stop() {
  STOPPED=$1
  echo "caught SIG$1: asking the workers to save a recovery checkpoint and stop"
  kill -TERM "$SRUN_PID" 2>/dev/null || true
}
trap 'stop USR1' USR1
trap 'stop TERM' TERM

# wait returns early when a trapped signal arrives: wait again until srun has exited
while :; do
  wait "$SRUN_PID"
  RC=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

if [ -n "$STOPPED" ]; then
  echo "stopped by SIG$STOPPED (srun exit $RC): requeueing job ${SLURM_JOB_ID:-?}; it continues with --resume auto"
  scontrol requeue "${SLURM_JOB_ID}"
  exit 0
fi
exit "$RC"
