// Block-wide sums for the CUDA reduction kernels, in a fixed order (a pairwise tree over the
// threads in shared memory): the same inputs give the same bits on every run, whatever the
// scheduling. No atomics on floating values anywhere in sbfast's reductions for that reason.
#pragma once

namespace sbfast {
namespace cuda {

// Sum over the block of `value` (every thread of a block of kThreads threads must call it; it
// synchronises). `scratch` holds kThreads values in shared memory. The total is returned to
// every thread. kThreads: a power of two.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T value, T* scratch) {
  static_assert((kThreads & (kThreads - 1)) == 0, "block_sum needs a power-of-two block");
  scratch[threadIdx.x] = value;
  __syncthreads();
#pragma unroll
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (static_cast<int>(threadIdx.x) < stride) scratch[threadIdx.x] = scratch[threadIdx.x] + scratch[threadIdx.x + stride];
    __syncthreads();
  }
  const T total = scratch[0];
  __syncthreads();  // scratch may be reused by the caller right after
  return total;
}

}  // namespace cuda
}  // namespace sbfast
