// CPU kernel of sbfast::ellipsoid_sq_norms: for K multipliers lambda_k,
//   out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2      (s = inv_scale = 1/c)
// the squared weighted norms of K candidate projections of z onto an ellipsoid, in one read of
// z and s (the sharpness measure's bisection tests several lambdas per pass).
//
// Per chunk of kChunk elements, a = (z s)^2 and b = 2 s^2 go to a stack buffer once; then one
// vectorised loop per lambda sums a / (1 + lambda b)^2 into kLanes accumulators (z's
// accumulation type). Chunk sums land in a [chunks, K] float64 buffer summed in chunk order, so
// the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../sbfast_math.h"
#include "kernels.h"

namespace sbfast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;
constexpr int kLanes = 16;

// The build targets baseline x86-64, where this loop runs in SSE2 lanes; a clone per vector
// ISA, picked at load time, runs it in AVX2/AVX-512 lanes instead (measured 1.6-1.8x on 7-15
// lambdas). Every clone sums in the same order with IEEE division, so they agree bit for bit.
#if defined(__x86_64__) && defined(__GNUC__)
#define SBFAST_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SBFAST_VECTOR_CLONES
#endif

template <typename acc_t>
inline void lambda_sums(const acc_t* a, const acc_t* b, int64_t n, const double* lambdas, int64_t k_count,
                        double* out) {
  for (int64_t k = 0; k < k_count; ++k) {
    const acc_t lam = static_cast<acc_t>(lambdas[k]);
    acc_t lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        lanes[l] = math::add_rn(lanes[l], math::ellipsoid_term<acc_t>(a[i + l], b[i + l], lam));
      }
    }
    acc_t tail = 0;
    for (; i < n; ++i) tail = math::add_rn(tail, math::ellipsoid_term<acc_t>(a[i], b[i], lam));
    double total = static_cast<double>(tail);
    for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lanes[l]);
    out[k] = total;
  }
}

SBFAST_VECTOR_CLONES void chunk_lambda_sums(const float* a, const float* b, int64_t n, const double* lambdas,
                                            int64_t k_count, double* out) {
  lambda_sums<float>(a, b, n, lambdas, k_count, out);
}

SBFAST_VECTOR_CLONES void chunk_lambda_sums(const double* a, const double* b, int64_t n, const double* lambdas,
                                            int64_t k_count, double* out) {
  lambda_sums<double>(a, b, n, lambdas, k_count, out);
}

// One chunk: a = (z s)^2 and b = 2 s^2 into stack buffers, then every lambda's sum over them.
template <typename scalar_t>
void chunk_sums(const scalar_t* z, const scalar_t* s, int64_t n, const double* lambdas, int64_t k_count,
                double* out) {
  using acc_t = typename math::acc_type<scalar_t>::type;
  acc_t a[kChunk];
  acc_t b[kChunk];
  for (int64_t i = 0; i < n; ++i) {
    const acc_t si = static_cast<acc_t>(s[i]);
    a[i] = math::ellipsoid_a<acc_t>(static_cast<acc_t>(z[i]), si);
    b[i] = math::ellipsoid_b<acc_t>(si);
  }
  chunk_lambda_sums(a, b, n, lambdas, k_count, out);
}

}  // namespace

at::Tensor ellipsoid_sq_norms(const at::Tensor& z, const at::Tensor& inv_scale, at::ArrayRef<double> lambdas) {
  constexpr const char* op = "sbfast::ellipsoid_sq_norms";
  checks::ellipsoid_sq_norms_inputs(z, inv_scale, lambdas, c10::DeviceType::CPU, op);
  const int64_t k_count = static_cast<int64_t>(lambdas.size());
  const auto out_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor zc = z.contiguous();
  const at::Tensor sc = inv_scale.contiguous();
  const int64_t n = zc.numel();
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partials(static_cast<size_t>(chunks * k_count), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "ellipsoid_sq_norms_cpu", [&] {
    const scalar_t* zp = zc.const_data_ptr<scalar_t>();
    const scalar_t* sp = sc.const_data_ptr<scalar_t>();
    at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c) {
        const int64_t begin = c * kChunk;
        chunk_sums<scalar_t>(zp + begin, sp + begin, std::min(n, begin + kChunk) - begin, lambdas.data(), k_count,
                             partials.data() + c * k_count);
      }
    });
  });
  std::vector<double> totals(static_cast<size_t>(k_count), 0.0);
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t k = 0; k < k_count; ++k) totals[k] += partials[c * k_count + k];
  }
  at::Tensor out = at::empty({k_count}, at::TensorOptions().dtype(at::kDouble));
  std::copy(totals.begin(), totals.end(), out.mutable_data_ptr<double>());
  return out_dtype == at::kDouble ? out : out.to(out_dtype);
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("ellipsoid_sq_norms", &ellipsoid_sq_norms);
}

}  // namespace cpu
}  // namespace sbfast
