import os

# Under pytest-xdist (`pytest -n 2`) each worker gets its share of the cores. torch's default of one
# thread per core makes two workers on two cores fight for them: the suite ran 1.3x faster with two
# workers of two threads, and about 2x with one thread each. Set before torch starts its thread pool;
# subprocesses that tests start inherit it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _workers))

import torch  # noqa: E402

if _workers > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Triton picks interpreter-or-compiler when it is first imported, and importing diffusers already
# imports it (through torch._dynamo). So the choice is made here, before any test module: without
# CUDA the Triton kernels run in Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
