#!/usr/bin/env bash
# DeepSpeed launcher, one node, N processes (one per GPU; on a CPU-only machine N CPU processes).
#
#   launch/deepspeed_single_node.sh 8 configs/mnist_seed.yaml --parallel.deepspeed_config=configs/deepspeed/zero1.json
#
# Arguments: processes, config path, then dotted overrides. The global train.batch_size is split
# evenly over the processes; experts are sharded over parallel.ep_size ranks (default: all).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 NPROC CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
nproc="$1"; config="$2"; shift 2
source "$(dirname "$0")/common.sh"
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" \
  "$(command -v moe-vae)" train --config "$config" "$@"
