// The extension module rlcm_fast._C. It sees raw pointers and sizes only, never torch objects, so it
// does not depend on PyTorch's C++ ABI; rlcm_fast/_native.py wraps it for torch tensors.
#include <pybind11/pybind11.h>

#include "policy_step.h"

PYBIND11_MODULE(_C, module) {
    module.doc() = "rlcm-fast native kernels (raw-pointer interface; use rlcm_fast._native)";
    rlcm_fast::bind_policy_step(module);
}
