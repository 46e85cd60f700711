#!/usr/bin/env bash
# Launch train_kd.py with torchrun: NUM_PROC processes on this node (one per GPU).
#
#   ./distributed_train.sh NUM_PROC [train_kd.py args...]
#
# One node, 8 GPUs:
#   ./distributed_train.sh 8 --config recipes/swinl_r50.yaml --data-dir /data/imagenet --resume auto
#
# Several nodes: run the same command on every node with the node count, this node's rank and
# the address of node 0 in the environment (static rendezvous on MASTER_ADDR:MASTER_PORT).
# Two nodes of 8 GPUs, node 0 at 10.0.0.1:
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./distributed_train.sh 8 --config ...
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 ./distributed_train.sh 8 --config ...
# Or with c10d rendezvous (no node ranks; any node can be first; a RDZV_ID names the job):
#   every node:  NNODES=2 RDZV_ENDPOINT=10.0.0.1:29400 RDZV_ID=job42 ./distributed_train.sh 8 --config ...
# tools/slurm_train.sh does this under SLURM.
#
# Environment:
#   PYTHON         interpreter (default: .venv/bin/python next to this script if present, else python3)
#   NNODES         number of nodes (default 1)
#   NODE_RANK      rank of this node, 0..NNODES-1 (static rendezvous; default 0)
#   MASTER_ADDR    address of node 0 (default 127.0.0.1)
#   MASTER_PORT    port on node 0 (default 29500)
#   RDZV_ENDPOINT  host:port of a c10d rendezvous; when set, NODE_RANK/MASTER_* are not used
#   RDZV_ID        rendezvous job id with RDZV_ENDPOINT (default: scalekd)
#   MAX_RESTARTS   torchrun --max-restarts: restart all workers this many times after a failure
#                  (pair it with --resume auto so a restart continues from the newest checkpoint;
#                  default 0)
#   TORCH_DIST_TIMEOUT  seconds a collective waits for a dead or hung rank before failing
#                  (train_kd.py --dist-timeout; default 1800)
#   SHUTDOWN_TIMEOUT  seconds torchrun gives the workers to save after a stop signal before it
#                  kills them (default 120)
# A SIGTERM/SIGUSR1/SIGINT to this script reaches every worker: each finishes its step, rank 0
# writes a recovery checkpoint, and the workers exit with code 75 (torchrun itself then exits
# non-zero; see docs/preemption.md).
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 NUM_PROC [train_kd.py args...]  (NUM_PROC: processes on this node, e.g. 8)" >&2
  exit 2
fi
NUM_PROC=$1
shift

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi

NNODES=${NNODES:-1}
# torchrun forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the workers by default; SIGUSR1 (SLURM's usual
# warning signal) is added so every preemption signal ends in a recovery checkpoint.
LAUNCH=(--nnodes "$NNODES" --nproc-per-node "$NUM_PROC" --max-restarts "${MAX_RESTARTS:-0}"
        --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "${SHUTDOWN_TIMEOUT:-120}")
if [ -n "${RDZV_ENDPOINT:-}" ]; then
  LAUNCH+=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-scalekd}")
elif [ "$NNODES" -gt 1 ]; then
  LAUNCH+=(--node-rank "${NODE_RANK:-0}" --master-addr "${MASTER_ADDR:-127.0.0.1}"
           --master-port "${MASTER_PORT:-29500}")
else
  # one node: a free port is found unless MASTER_PORT is given (several jobs on one machine)
  if [ -n "${MASTER_PORT:-}" ]; then
    LAUNCH+=(--master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "$MASTER_PORT")
  else
    LAUNCH+=(--standalone)
  fi
fi

# one CPU thread per worker unless told otherwise (torchrun would warn and set it to 1 anyway)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

exec "$PYTHON" -m torch.distributed.run "${LAUNCH[@]}" "$HERE/train_kd.py" "$@"
