# Sourced by the scripts that start every process of their machine themselves
# (deepspeed_single_node.sh, torchrun.sh, accelerate.sh): on a machine without CUDA, DeepSpeed
# runs on its CPU accelerator (gloo) with one OpenMP thread per process unless OMP_NUM_THREADS
# says otherwise. deepspeed_multi_node.sh and slurm_deepspeed.sbatch start processes on other
# nodes, which a check here would not see: they are for GPU nodes and do not source it.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
