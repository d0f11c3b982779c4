// CPU policy step of multi-step consistency sampling (the math is documented in
// rlcm_fast/policy_step.py; policy_step_reference there is the definition this code is tested against).
#pragma once

#include <pybind11/pybind11.h>

namespace rlcm_fast {

// Adds policy_step_{forward,backward}_{float32,float64} to the extension module.
void bind_policy_step(pybind11::module_& module);

}  // namespace rlcm_fast
