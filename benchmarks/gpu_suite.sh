#!/usr/bin/env bash
# Every single-GPU figure of docs/performance.md in one run, for a session with a GPU:
#   bash benchmarks/gpu_suite.sh [OUT_DIR]      (default gpu_results/; ~15 min on an H100)
# Each step's command and output go to OUT_DIR/<step>.txt and to the terminal. Written and
# checked for syntax on a CPU machine; not yet run on a GPU.
set -euo pipefail
OUT=${1:-gpu_results}
mkdir -p "$OUT"
# The fast path: compiled step with CUDA graphs, no host sync inside a step, TF32, fused
# first layer (dense routing only), fused Adam (the default).
FAST=(--train.compile=reduce-overhead --train.host_sync=log --train.tf32=true)
DENSE_FAST=("${FAST[@]}" --model.fused_input=true)
MANY=(--config configs/many_experts.yaml --data.train_limit=null --train.batch_size=4096
  --model.routing=topk --model.top_k=1)

step() {  # step NAME COMMAND...: run it, keep the command line and its output
  local name=$1; shift
  echo "\$ $*" | tee "$OUT/$name.txt"
  "$@" 2>&1 | tee -a "$OUT/$name.txt"
}

step device nvidia-smi
# 1. Founding recipe (E=10, batch 100): eager and fast path, each beside the naive loop.
step recipe_eager moe-vae bench --steps 300 --repeats 5
step recipe_fast moe-vae bench --steps 300 --repeats 5 "${DENSE_FAST[@]}"
step recipe_fast_bf16 moe-vae bench --steps 300 --repeats 5 "${DENSE_FAST[@]}" \
  --train.precision=bf16
# 2. Kernels and time per phase, eager and fast.
step profile_eager moe-vae bench --no-baseline --steps 50 --repeats 1 --profile 20
step profile_fast moe-vae bench --no-baseline --steps 50 --repeats 1 --profile 20 "${DENSE_FAST[@]}"
# 3. The whole recipe, 100 epochs, wall clock and accuracy: eager, then fast.
step train_eager /usr/bin/time -v moe-vae train --config configs/mnist_seed.yaml \
  --output.dir="$OUT/runs" --output.name=eager --quiet
step train_fast /usr/bin/time -v moe-vae train --config configs/mnist_seed.yaml \
  --output.dir="$OUT/runs" --output.name=fast --quiet "${DENSE_FAST[@]}"
# 4. Batch 4096: samples/s (target >= 5M).
step batch4096 moe-vae bench --no-baseline --steps 200 --repeats 3 --train.batch_size=4096 \
  "${DENSE_FAST[@]}"
step batch4096_bf16 moe-vae bench --no-baseline --steps 200 --repeats 3 \
  --train.batch_size=4096 "${DENSE_FAST[@]}" --train.precision=bf16
# 5. Top-1 routing, 16 vs 1024 experts, batched and grouped GEMM (target: 1024 >= 50% of 16).
for gemm in batched grouped; do
  for experts in 16 1024; do
    step "topk_${experts}_${gemm}" moe-vae bench --no-baseline --steps 100 --repeats 3 \
      "${MANY[@]}" --model.num_experts="$experts" --model.expert_gemm="$gemm" "${FAST[@]}"
  done
done
echo "results in $OUT/"
