import os

from rlcm_fast.launch import usable_cpu_cores  # imports no torch

# Under pytest-xdist (README's `pytest -n auto`) each worker gets its share of the cores: with torch's
# default of one thread per core, workers fight for them. Measured on 2 Xeon cores: the suite took 1023 s
# in one process, 790 s in two workers of two threads, 525 s in two workers of one thread. Set before
# torch starts its thread pool; subprocesses that tests start inherit it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cpu_cores() // _workers))

import torch  # noqa: E402

if _workers > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton picks interpreter-or-compiler when it is first imported, and importing diffusers already
# imports it (through torch._dynamo). So the choice is made here, before any test module: without
# CUDA the Triton kernels run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
