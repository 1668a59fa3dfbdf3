// CUDA kernel of sbfast::ellipsoid_sq_norms: for K multipliers lambda_k,
//   out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2      (s = inv_scale = 1/c)
// the squared weighted norms of K candidate projections of z onto an ellipsoid, in one read of
// z and s.
//
// Each block takes one chunk of kThreads * kItems elements: every thread loads its kItems pairs,
// forms a = (z s)^2 and b = 2 s^2 once (sbfast_math.h, the CPU kernel's arithmetic), and for each
// lambda a fixed-order block sum (block_reduce.cuh) lands in row `chunk` of a [chunks, K] float64
// partials buffer; a second kernel, one block per lambda, sums a column in chunk order. The
// lambdas travel by value in the kernel's arguments, so a captured graph replays them as given.
// No atomics, no host synchronisation: bit-reproducible run to run.
//
// Strided inputs are read from contiguous copies (the CPU kernel does the same).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"
#include "../sbfast_math.h"
#include "block_reduce.cuh"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;
constexpr int kFinalThreads = 1024;

struct Lambdas {
  double value[checks::kMaxEllipsoidLambdas];
  int count;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    ellipsoid_partials_kernel(const scalar_t* __restrict__ z, const scalar_t* __restrict__ s, int64_t n,
                              Lambdas lambdas, double* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads];
  const int64_t chunk = blockIdx.x;
  const int64_t begin = chunk * kChunk;
  acc_t a[kItems];
  acc_t b[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = begin + static_cast<int64_t>(j) * kThreads + threadIdx.x;
    const acc_t zi = i < n ? static_cast<acc_t>(z[i]) : acc_t(0);
    const acc_t si = i < n ? static_cast<acc_t>(s[i]) : acc_t(0);
    a[j] = math::ellipsoid_a<acc_t>(zi, si);
    b[j] = math::ellipsoid_b<acc_t>(si);
  }
  for (int k = 0; k < lambdas.count; ++k) {
    const acc_t lam = static_cast<acc_t>(lambdas.value[k]);
    acc_t acc = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) acc = math::add_rn(acc, math::ellipsoid_term<acc_t>(a[j], b[j], lam));
    const acc_t total = block_sum<kThreads>(acc, scratch);
    if (threadIdx.x == 0) partials[chunk * lambdas.count + k] = static_cast<double>(total);
  }
}

// out[k] = sum over chunks of partials[chunk, k], in float64, in a fixed order; block k.
template <typename out_t>
__global__ void __launch_bounds__(kFinalThreads)
    sum_columns_kernel(const double* __restrict__ partials, int64_t chunks, int k_count, out_t* __restrict__ out) {
  __shared__ double scratch[kFinalThreads];
  const int k = blockIdx.x;
  double acc = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kFinalThreads) acc += partials[c * k_count + k];
  const double total = block_sum<kFinalThreads>(acc, scratch);
  if (threadIdx.x == 0) out[k] = static_cast<out_t>(total);
}

}  // namespace

at::Tensor ellipsoid_sq_norms(const at::Tensor& z, const at::Tensor& inv_scale, at::ArrayRef<double> lambdas) {
  constexpr const char* op = "sbfast::ellipsoid_sq_norms";
  checks::ellipsoid_sq_norms_inputs(z, inv_scale, lambdas, c10::DeviceType::CUDA, op);
  const at::cuda::CUDAGuard guard(z.device());
  const int k_count = static_cast<int>(lambdas.size());
  const auto out_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = at::TensorOptions().device(z.device());
  const int64_t n = z.numel();
  if (n == 0) return at::zeros({k_count}, opts.dtype(out_dtype));
  const at::Tensor zc = z.contiguous();
  const at::Tensor sc = inv_scale.contiguous();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  TORCH_CHECK(chunks <= INT32_MAX, op, ": ", chunks, " chunks exceed the grid");
  Lambdas table{};
  table.count = k_count;
  for (int k = 0; k < k_count; ++k) table.value[k] = lambdas[k];
  at::Tensor partials = at::empty({chunks * k_count}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty({k_count}, opts.dtype(out_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ellipsoid_sq_norms_cuda", [&] {
    using acc_t = typename math::acc_type<scalar_t>::type;
    ellipsoid_partials_kernel<scalar_t, acc_t><<<static_cast<unsigned>(chunks), kThreads, 0, stream>>>(
        zc.const_data_ptr<scalar_t>(), sc.const_data_ptr<scalar_t>(), n, table, partials.mutable_data_ptr<double>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "ellipsoid_sq_norms_cuda_sum", [&] {
    sum_columns_kernel<scalar_t><<<k_count, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), chunks,
                                                                       k_count, out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("ellipsoid_sq_norms", &ellipsoid_sq_norms);
}

}  // namespace cuda
}  // namespace sbfast
