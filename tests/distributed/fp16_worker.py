"""`moe-vae` with DeepSpeed's CPU accelerator claiming fp16, so CI can run DeepSpeed's fp16 loss
scaling: a CPU with AVX512-FP16 has it, this one does not, and fp16 tensors compute on any CPU
(slowly). Everything else is the real command."""

import sys

import torch
from deepspeed.accelerator import get_accelerator

accelerator = get_accelerator()  # one per process: what DeepSpeed and moe-vae ask
accelerator.is_fp16_supported = lambda: True
accelerator.supported_dtypes = lambda: [torch.float32, torch.bfloat16, torch.float16]

from moe_vae.cli import main  # noqa: E402  (after the accelerator is told)

sys.exit(main())
