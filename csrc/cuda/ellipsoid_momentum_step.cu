// CUDA kernel of sbfast::ellipsoid_momentum_step_: APGD's step after its ellipsoid projection,
//   u = z / (1 + lambda t)   (t = two_inv2 = 2 / c^2; lambda = 0: u = z)
//   z = lerp(prev, u, m),  point = w0 + z
// one grid-stride pass over contiguous runs (reads z, t, prev, w0; writes z, point). The
// per-element arithmetic is the CPU kernel's (sbfast_math.h: _rn intrinsics, IEEE division, the
// lerp's one fma), so both devices give the same bits for the same inputs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../sbfast_math.h"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    momentum_step_kernel(scalar_t* __restrict__ z, scalar_t* __restrict__ point, const scalar_t* __restrict__ t,
                         const scalar_t* __restrict__ prev, const scalar_t* __restrict__ w0, acc_t lam, acc_t m,
                         int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n; i += stride) {
    const acc_t u = math::ellipsoid_projected<acc_t>(static_cast<acc_t>(z[i]), static_cast<acc_t>(t[i]), lam);
    const scalar_t v = static_cast<scalar_t>(math::momentum_lerp<acc_t>(static_cast<acc_t>(prev[i]), u, m));
    z[i] = v;
    point[i] = static_cast<scalar_t>(math::add_rn(static_cast<acc_t>(w0[i]), static_cast<acc_t>(v)));
  }
}

}  // namespace

void ellipsoid_momentum_step_(const at::Tensor& z, const at::Tensor& point, const at::Tensor& two_inv2,
                              const at::Tensor& prev, const at::Tensor& w0, double lmbd, double momentum) {
  constexpr const char* op = "sbfast::ellipsoid_momentum_step_";
  checks::ellipsoid_momentum_step_inputs(z, point, two_inv2, prev, w0, lmbd, momentum, c10::DeviceType::CUDA, op);
  const int64_t n = z.numel();
  if (n == 0) return;
  const at::cuda::CUDAGuard guard(z.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + kThreads * 4 - 1) / (kThreads * 4)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ellipsoid_momentum_step_cuda", [&] {
    using acc_t = typename math::acc_type<scalar_t>::type;
    momentum_step_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        z.mutable_data_ptr<scalar_t>(), point.mutable_data_ptr<scalar_t>(), two_inv2.const_data_ptr<scalar_t>(),
        prev.const_data_ptr<scalar_t>(), w0.const_data_ptr<scalar_t>(), static_cast<acc_t>(lmbd),
        static_cast<acc_t>(momentum), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("ellipsoid_momentum_step_", &ellipsoid_momentum_step_);
}

}  // namespace cuda
}  // namespace sbfast
