#!/usr/bin/env bash
# Every single-GPU figure of docs/performance.md, on a machine with a CUDA GPU:
#   bash benchmarks/gpu_suite.sh [OUT_DIR] [PART ...]
# PART: tests graph_tests recipe profile train_eager train batch topk topk_levers scaling
# (default: all of them, in that order).
# Each part should take under 10 minutes on an H100, so a time-limited session can run them in
# separate calls; the many-expert parts give each step a timeout that keeps the part's worst
# case under 10 minutes (a hung step costs its own time, not the part's). Each step's command line and output go to OUT_DIR/<step>.txt, and one line
# per step (name, exit code, seconds) to OUT_DIR/summary.txt. A failing step is recorded and
# the rest still run. Give OUT_DIR a folder that comes back even when a call runs past its time
# limit (the device tool's $OUT), so a part cut off still returns what it measured. Written on
# a CPU machine: syntax and flag sets checked there, not yet run on a GPU.
set -uo pipefail
OUT=${1:-gpu_results}
shift || true
PARTS=("$@")
ALL=(tests graph_tests recipe profile train_eager train batch topk topk_levers scaling)
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${ALL[@]}")
mkdir -p "$OUT"
# The installed command, or the package run from this checkout.
# The Python that has torch and moe_vae (PYTHON overrides python3).
PY=${PYTHON:-python3}
if command -v moe-vae >/dev/null; then MV=(moe-vae); else MV=("$PY" -m moe_vae); fi
# The fast path, two ways. FAST: torch.compile's CUDA graphs of forward and backward. GRAPH:
# the whole step (with Adam and the batch gather) as one CUDA graph over a compiled forward.
# Both: no host sync inside a step, TF32, fused Adam (the default); dense routing adds the
# fused first layer.
FAST=(--train.compile=reduce-overhead --train.host_sync=log --train.tf32=true)
GRAPH=(--train.cuda_graph=true --train.compile=default --train.host_sync=log --train.tf32=true)
DENSE_FAST=("${FAST[@]}" --model.fused_input=true)
DENSE_GRAPH=("${GRAPH[@]}" --model.fused_input=true)
# The many-experts shapes at batch 4096 on the whole training set.
MANY=(--config configs/many_experts.yaml --data.train_limit=null --train.batch_size=4096)
# Top-1 routed by a sample of the manager's probabilities (Gumbel): greedy top-1 crowds a
# flat manager's choices onto a few experts and drops most pairs (docs/performance.md),
# which would time a degenerate step. Sampled, ~10 % are dropped at capacity 1.25.
TOP1=(--model.routing=topk --model.top_k=1 --model.route_noise=gumbel)
# Wall-clock runs track to the JSON-lines file only: W&B's start-up is not the trainer's time.
RUN=(--output.dir="$OUT/runs" --quiet --track.wandb=disabled)

step() {  # step NAME COMMAND...: run it, keep its command line, output, exit code and time
  local name=$1 t0=$SECONDS rc
  shift
  { echo "\$ $*"; "$@"; } 2>&1 | tee "$OUT/$name.txt"
  rc=${PIPESTATUS[0]}
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

part_tests() {  # the device, and the CUDA-only tests but the graphs' (sync rule, bf16 kernels)
  step device nvidia-smi
  # Fails without CUDA: then every test in tests/gpu would be skipped, and pass.
  step versions "$PY" -c "import torch; print(torch.__version__, torch.version.cuda,
torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  step gpu_tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu -k "not matches_eager"
}

part_graph_tests() {  # CUDA graphs (torch.compile's and the whole step) against eager
  step gpu_graph_tests "$PY" -m pytest -q -rs -p no:cacheprovider tests/gpu -k matches_eager
}

part_recipe() {  # founding recipe (E=10, batch 100): eager and fast path beside the naive loop
  step recipe_eager "${MV[@]}" bench --steps 300 --repeats 5
  step recipe_fast "${MV[@]}" bench --steps 300 --repeats 5 "${DENSE_FAST[@]}"
  step recipe_graph "${MV[@]}" bench --steps 300 --repeats 5 "${DENSE_GRAPH[@]}"
  step recipe_graph_eager "${MV[@]}" bench --steps 300 --repeats 5 "${DENSE_GRAPH[@]}" \
    --train.compile=none
  step recipe_graph_bf16 "${MV[@]}" bench --steps 300 --repeats 5 "${DENSE_GRAPH[@]}" \
    --train.precision=bf16
}

part_profile() {  # kernels and time per phase, eager and fast
  step profile_eager "${MV[@]}" bench --no-baseline --steps 50 --repeats 1 --profile 20
  step profile_fast "${MV[@]}" bench --no-baseline --steps 50 --repeats 1 --profile 20 \
    "${DENSE_FAST[@]}"
}

# The whole recipe, 100 epochs: final loss and accuracy, and the loop's own training time
# ("trained ... in"); the summary's seconds add start-up, compilation and evaluation.
part_train_eager() {
  step train_eager "${MV[@]}" train --config configs/mnist_seed.yaml \
    "${RUN[@]}" --output.name=eager
}

part_train() {  step train_fast "${MV[@]}" train --config configs/mnist_seed.yaml \
    "${RUN[@]}" --output.name=fast "${DENSE_FAST[@]}"
  step train_graph "${MV[@]}" train --config configs/mnist_seed.yaml \
    "${RUN[@]}" --output.name=graph "${DENSE_GRAPH[@]}"
  step compare "$PY" benchmarks/compare_runs.py "$OUT/runs/eager" "$OUT/runs/fast" \
    "$OUT/runs/graph"
}

part_batch() {  # founding recipe's model at batch 4096: samples/s (target >= 5M)
  step batch4096 "${MV[@]}" bench --no-baseline --steps 200 --repeats 3 \
    --train.batch_size=4096 "${DENSE_FAST[@]}"
  step batch4096_graph "${MV[@]}" bench --no-baseline --steps 200 --repeats 3 \
    --train.batch_size=4096 "${DENSE_GRAPH[@]}"
  step batch4096_graph_bf16 "${MV[@]}" bench --no-baseline --steps 200 --repeats 3 \
    --train.batch_size=4096 "${DENSE_GRAPH[@]}" --train.precision=bf16
}

part_topk() {  # top-1, 16 vs 1024 experts, both GEMM layouts (target: 1024 >= 50 % of 16)
  # Grouped at 1023: CUDA's grouped kernel takes fewer than 1024 groups, one per expert.
  local gemm experts
  for gemm in batched grouped; do
    local many=1024
    [[ $gemm == grouped ]] && many=1023
    for experts in 16 "$many"; do
      step "topk_${experts}_${gemm}" timeout 145 "${MV[@]}" bench --no-baseline --steps 100 --repeats 3 \
        "${MANY[@]}" "${TOP1[@]}" --model.num_experts="$experts" --model.expert_gemm="$gemm" \
        "${GRAPH[@]}"
    done
  done
}

# The two levers on top-1's optimizer traffic (every expert's weights and Adam state, read
# and written each step, docs/performance.md): weights and moments in bf16 (half the bytes;
# stochastic rounding, the default, and torch's fused Adam rounding to nearest), and a larger
# batch (the same bytes over 4x the inputs). Batched layout, whole-step graph.
part_topk_levers() {
  local experts
  # The optimizer step alone over the 1024-expert parameter count, four ways.
  step bf16_adam timeout 60 "$PY" benchmarks/bf16_adam.py --steps 50
  for experts in 16 1024; do
    local top1=(bench --no-baseline --repeats 2 "${MANY[@]}" "${TOP1[@]}"
      --model.num_experts="$experts" --model.expert_gemm=batched "${GRAPH[@]}")
    step "topk_${experts}_bf16true" timeout 85 "${MV[@]}" "${top1[@]}" --steps 100 \
      --train.precision=bf16-true
    step "topk_${experts}_bf16true_nearest" timeout 85 "${MV[@]}" "${top1[@]}" --steps 100 \
      --train.precision=bf16-true --optim.bf16_rounding=nearest
    step "topk_${experts}_batch16k" timeout 85 "${MV[@]}" "${top1[@]}" --steps 50 \
      --train.batch_size=16384
  done
}

part_scaling() {  # the inputs of benchmarks/scaling_model.py: 256 experts, dense and top-1,
  # at batch 4096 and 1024 (two batch sizes give the step's fixed cost: --ref-small-*)
  step scaling_dense "${MV[@]}" bench --no-baseline --steps 50 --repeats 3 "${MANY[@]}" \
    "${GRAPH[@]}"
  step scaling_top1 "${MV[@]}" bench --no-baseline --steps 100 --repeats 3 "${MANY[@]}" \
    "${TOP1[@]}" --model.expert_gemm=batched "${GRAPH[@]}"
  step scaling_dense_b1024 "${MV[@]}" bench --no-baseline --steps 100 --repeats 3 "${MANY[@]}" \
    "${GRAPH[@]}" --train.batch_size=1024
  step scaling_top1_b1024 "${MV[@]}" bench --no-baseline --steps 100 --repeats 3 "${MANY[@]}" \
    "${TOP1[@]}" --model.expert_gemm=batched "${GRAPH[@]}" --train.batch_size=1024
}

for part in "${PARTS[@]}"; do
  if ! declare -F "part_$part" >/dev/null; then
    echo "gpu_suite.sh: unknown part '$part' (expected one of: ${ALL[*]})" >&2
    exit 2
  fi
done
for part in "${PARTS[@]}"; do
  "part_$part"
done
echo "results in $OUT/ (summary: $OUT/summary.txt)"
