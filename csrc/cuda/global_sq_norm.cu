// CUDA kernel of sbfast::global_sq_norm: sum over a list of tensors of sum_i t_i^2.
//
// Two stages, no host synchronisation (so it can be captured in a CUDA graph): every tensor
// gets a grid-stride kernel whose blocks write one partial each into a shared workspace, then
// one deterministic sum over the workspace. No atomics, so the result is bit-reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sbfast_math.h"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerTensor = 1024;

template <typename scalar_t, typename acc_t>
__global__ void sq_sum_partials_kernel(const scalar_t* __restrict__ data, int64_t n,
                                       acc_t* __restrict__ partials) {
  acc_t acc = 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc = math::square_accumulate<acc_t>(acc, static_cast<acc_t>(data[i]));
  }
  __shared__ acc_t shared[kThreads];
  shared[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) shared[threadIdx.x] += shared[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) partials[blockIdx.x] = shared[0];
}

int64_t blocks_for(int64_t n) {
  return std::min<int64_t>(kMaxBlocksPerTensor, (n + kThreads * 8 - 1) / (kThreads * 8));
}

}  // namespace

at::Tensor global_sq_norm(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "sbfast::global_sq_norm: empty tensor list");
  const auto device = tensors[0].device();
  bool any_double = false;
  int64_t total_blocks = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device() == device, "sbfast::global_sq_norm: tensors on ", device, " and ", t.device());
    TORCH_CHECK(at::isFloatingType(t.scalar_type()),
                "sbfast::global_sq_norm: expected floating tensors, got ", t.scalar_type());
    any_double = any_double || t.scalar_type() == at::kDouble;
    total_blocks += blocks_for(t.numel());
  }
  const at::cuda::CUDAGuard guard(device);
  const auto acc_dtype = any_double ? at::kDouble : at::kFloat;
  at::Tensor partials = at::zeros({std::max<int64_t>(total_blocks, 1)},
                                  at::TensorOptions().device(device).dtype(acc_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t offset = 0;
  for (const auto& t : tensors) {
    const int64_t n = t.numel();
    if (n == 0) continue;
    const at::Tensor c = t.contiguous();
    const int64_t blocks = blocks_for(n);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "global_sq_norm_cuda", [&] {
      if (any_double) {
        sq_sum_partials_kernel<scalar_t, double><<<blocks, kThreads, 0, stream>>>(
            c.const_data_ptr<scalar_t>(), n, partials.mutable_data_ptr<double>() + offset);
      } else {
        sq_sum_partials_kernel<scalar_t, float><<<blocks, kThreads, 0, stream>>>(
            c.const_data_ptr<scalar_t>(), n, partials.mutable_data_ptr<float>() + offset);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    offset += blocks;
  }
  return partials.sum();
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("global_sq_norm", &global_sq_norm);
}

}  // namespace cuda
}  // namespace sbfast
