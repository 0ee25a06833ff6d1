#!/usr/bin/env bash
# torchrun with c10d rendezvous; run the same command on every node.
#
#   NNODES=2 NODE_RANK=0 RDZV_HOST=node-001 launch/torchrun.sh 8 configs/mnist_seed.yaml   # node 0
#   NNODES=2 NODE_RANK=1 RDZV_HOST=node-001 launch/torchrun.sh 8 configs/mnist_seed.yaml   # node 1
#
# Arguments: processes per node, config path, dotted overrides. The DeepSpeed engine is used
# whenever more than one process runs (parallel.engine=auto).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC_PER_NODE CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
nproc="$1"; config="$2"; shift 2
source "$(dirname "$0")/common.sh"
exec torchrun --nnodes "${NNODES:-1}" --nproc-per-node "$nproc" --node-rank "${NODE_RANK:-0}" \
  --rdzv-backend c10d --rdzv-endpoint "${RDZV_HOST:-127.0.0.1}:${RDZV_PORT:-29400}" \
  --rdzv-id "${RDZV_ID:-moe-vae}" \
  -m moe_vae train --config "$config" "$@"
