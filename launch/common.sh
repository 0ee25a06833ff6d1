# Sourced by the launch scripts: on a machine without CUDA, DeepSpeed runs on its CPU
# accelerator (gloo) with one OpenMP thread per process unless OMP_NUM_THREADS says otherwise.
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
fi
