#!/usr/bin/env bash
# DeepSpeed launcher across nodes listed in a hostfile (passwordless ssh between them, the same
# environment and paths on every node). Run it on the first node of the hostfile.
#
#   launch/deepspeed_multi_node.sh launch/hostfile.example configs/mnist_seed.yaml --parallel.ep_size=8
#
# hostfile lines: "<hostname> slots=<gpus>". MASTER_ADDR defaults to the first host.
# DeepSpeed starts the other nodes through pdsh, whose remote shell parses the overrides again:
# DeepSpeed quotes only those with spaces, so a brace pattern (data/train-{000000..000005}.tar)
# or a glob character typed here is expanded there. Put such values in the config file.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 HOSTFILE CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
hostfile="$1"; config="$2"; shift 2
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  "$(command -v moe-vae)" train --config "$config" "$@"
