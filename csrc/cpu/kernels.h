// Declarations of the CPU kernels, so that the C++ unit tests (csrc/tests) can call them
// directly, without the Python-defined op schemas.
#pragma once

#include <ATen/ATen.h>

namespace sbfast {
namespace cpu {

// sum over tensors of sum_i t_i^2; float64 if any input is float64, else float32.
at::Tensor global_sq_norm(at::TensorList tensors);

}  // namespace cpu
}  // namespace sbfast
