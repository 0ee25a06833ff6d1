#!/usr/bin/env bash
# DeepSpeed launcher across nodes listed in a hostfile (passwordless ssh between them, the same
# environment and paths on every node). Run it on the first node of the hostfile.
#
#   launch/deepspeed_multi_node.sh launch/hostfile.example configs/mnist_seed.yaml --parallel.ep_size=8
#
# hostfile lines: "<hostname> slots=<gpus>". MASTER_ADDR defaults to the first host.
#
# Overrides are resolved here, once, into a config file that every node reads
# ($MOE_VAE_LAUNCH_DIR, default .moe_vae_launch/, on the shared paths): DeepSpeed starts the
# other nodes through pdsh, whose remote shell would parse the overrides again (DeepSpeed
# quotes only those with spaces, so a shard pattern like data/train-{000000..000005}.tar would
# be brace-expanded there). A bad override fails here, before any node starts.
set -euo pipefail
if [[ $# -lt 2 ]]; then
  echo "usage: $0 HOSTFILE CONFIG.yaml [--section.key=value ...]" >&2
  exit 2
fi
hostfile="$1"; config="$2"; shift 2
moe_vae="$(command -v moe-vae)"
if [[ $# -gt 0 ]]; then
  dir="${MOE_VAE_LAUNCH_DIR:-.moe_vae_launch}/$(date +%Y%m%d-%H%M%S)-$$"
  mkdir -p "$dir"
  resolved="$dir/$(basename "$config")"  # the same file name: runs keep the config's name
  "$moe_vae" train --config "$config" "$@" --print-config > "$resolved"
  echo "overrides resolved into $resolved" >&2
  config="$resolved"
  set --
fi
master="${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}"
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "${MASTER_PORT:-29500}" \
  "$moe_vae" train --config "$config"
