#!/usr/bin/env bash
# accelerate launch with a config file (launch/accelerate_config.yaml by default).
#
#   launch/accelerate.sh configs/mnist_seed.yaml --train.epochs=10
#   ACCELERATE_CONFIG=my_gpus.yaml launch/accelerate.sh configs/mnist_seed.yaml
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
config="$1"; shift
here="$(cd "$(dirname "$0")" && pwd)"
source "$(dirname "$0")/common.sh"
exec accelerate launch --config_file "${ACCELERATE_CONFIG:-$here/accelerate_config.yaml}" \
  --main_process_port "${MASTER_PORT:-29500}" -m moe_vae train --config "$config" "$@"
