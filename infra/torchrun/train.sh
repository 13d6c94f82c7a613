#!/bin/bash
# Training without Slurm: run this on every node (same arguments, NODE_RANK differs).
#   NNODES=2 NODE_RANK=0 HEAD_NODE=10.0.0.1 infra/torchrun/train.sh trainer/configs/tiny_moe.yaml
# One node (the default) is what `cpt train CONFIG` does for you.
set -euo pipefail

CONFIG=${1:?usage: infra/torchrun/train.sh CONFIG [key=value ...]}
shift
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$NPROC_PER_NODE" -lt 1 ]; then NPROC_PER_NODE=2; fi  # CPU: 2 gloo processes
HEAD_NODE=${HEAD_NODE:-127.0.0.1}
RDZV_PORT=${RDZV_PORT:-29500}
VENV=${VENV:-$PWD/.venv}
WORLD=$((NNODES * NPROC_PER_NODE))

exec "$VENV/bin/python" -m torch.distributed.run \
  --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$HEAD_NODE:$RDZV_PORT" \
  --local-ranks-filter 0 \
  -m moe_cpt.trainer "$CONFIG" "parallel.nproc=$NPROC_PER_NODE" "parallel.dp_shard=$WORLD" "$@"
