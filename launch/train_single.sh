#!/usr/bin/env bash
# One process, CPU or one GPU (picked automatically): the same entry point every launcher runs.
#
#   launch/train_single.sh configs/mnist_seed.yaml --train.epochs=10 --output.name=seed10
#
# Arguments: the config path, then any dotted overrides. OMP_NUM_THREADS defaults to the cores
# this process may use (CPU training is matmul-bound and oversubscription slows it down).
set -euo pipefail
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec moe-vae train --config "$config" "$@"
