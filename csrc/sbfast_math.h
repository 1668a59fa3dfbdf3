// Arithmetic shared by the CPU and CUDA kernels.
//
// CUDA cannot run on the team's machines, so every kernel keeps its per-element math here:
// the CPU tests then exercise the very arithmetic the GPU runs, and only the launch and the
// memory layout are GPU-only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SBFAST_HD __host__ __device__ __forceinline__
#else
#define SBFAST_HD inline
#endif

namespace sbfast {
namespace math {

// Accumulation type of a reduction over `scalar_t`: float64 stays float64, everything else
// (float32, bfloat16, float16) accumulates in float32.
template <typename scalar_t>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

// acc + x^2, the step of every squared-norm reduction.
template <typename acc_t>
SBFAST_HD acc_t square_accumulate(acc_t acc, acc_t x) {
  return acc + x * x;
}

}  // namespace math
}  // namespace sbfast
