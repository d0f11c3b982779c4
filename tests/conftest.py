import os

import torch

# Triton picks interpreter-or-compiler when it is first imported, and importing diffusers already
# imports it (through torch._dynamo). So the choice is made here, before any test module: without
# CUDA the Triton kernels run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
