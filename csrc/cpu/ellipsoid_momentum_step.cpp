// CPU kernel of sbfast::ellipsoid_momentum_step_: APGD's step after its ellipsoid projection,
//   u = z / (1 + lambda t)   (t = two_inv2 = 2 / c^2; lambda = 0: u = z)
//   z = lerp(prev, u, m),  point = w0 + z
// in one pass (reads z, t, prev, w0; writes z, point) where torch needs five.
//
// Rounding: float32/float64 results equal the reference's torch ops bit for bit (mul, add, div,
// lerp, add: sbfast_math.h). Contraction is off for this file; the lerp's fma is a hardware fma
// in the x86-64-v3 build of the loop, chosen at run time (x86_features.h). bfloat16/float16
// compute in float32 and round z and point once each. Elements are independent, so the chunks
// of at::parallel_for give the same bits for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels.h"
#include "x86_features.h"

// After the ATen headers: only this file's code is compiled without contraction.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "../checks.h"
#include "../sbfast_math.h"

namespace sbfast {
namespace cpu {
namespace {

constexpr int64_t kGrain = 1 << 15;

template <typename scalar_t>
SBFAST_ALWAYS_INLINE void step_body(scalar_t* __restrict z, scalar_t* __restrict point,
                                    const scalar_t* __restrict t, const scalar_t* __restrict prev,
                                    const scalar_t* __restrict w0, double lmbd, double momentum, int64_t n) {
  using acc_t = typename math::acc_type<scalar_t>::type;
  const acc_t lam = static_cast<acc_t>(lmbd);
  const acc_t m = static_cast<acc_t>(momentum);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t u = math::ellipsoid_projected<acc_t>(static_cast<acc_t>(z[i]), static_cast<acc_t>(t[i]), lam);
    const scalar_t v = static_cast<scalar_t>(math::momentum_lerp<acc_t>(static_cast<acc_t>(prev[i]), u, m));
    z[i] = v;
    point[i] = static_cast<scalar_t>(math::add_rn(static_cast<acc_t>(w0[i]), static_cast<acc_t>(v)));
  }
}

template <typename scalar_t>
SBFAST_TARGET_V3 void step_loop_v3(scalar_t* z, scalar_t* point, const scalar_t* t, const scalar_t* prev,
                                   const scalar_t* w0, double lmbd, double momentum, int64_t n) {
  step_body<scalar_t>(z, point, t, prev, w0, lmbd, momentum, n);
}

template <typename scalar_t>
void step_loop(scalar_t* z, scalar_t* point, const scalar_t* t, const scalar_t* prev, const scalar_t* w0, double lmbd,
               double momentum, int64_t n) {
  if (cpu_has_fma()) return step_loop_v3<scalar_t>(z, point, t, prev, w0, lmbd, momentum, n);
  step_body<scalar_t>(z, point, t, prev, w0, lmbd, momentum, n);
}

}  // namespace

void ellipsoid_momentum_step_(const at::Tensor& z, const at::Tensor& point, const at::Tensor& two_inv2,
                              const at::Tensor& prev, const at::Tensor& w0, double lmbd, double momentum) {
  constexpr const char* op = "sbfast::ellipsoid_momentum_step_";
  checks::ellipsoid_momentum_step_inputs(z, point, two_inv2, prev, w0, lmbd, momentum, c10::DeviceType::CPU, op);
  const int64_t n = z.numel();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "ellipsoid_momentum_step_cpu", [&] {
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    scalar_t* pp = point.mutable_data_ptr<scalar_t>();
    const scalar_t* tp = two_inv2.const_data_ptr<scalar_t>();
    const scalar_t* vp = prev.const_data_ptr<scalar_t>();
    const scalar_t* wp = w0.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      step_loop<scalar_t>(zp + begin, pp + begin, tp + begin, vp + begin, wp + begin, lmbd, momentum, end - begin);
    });
  });
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("ellipsoid_momentum_step_", &ellipsoid_momentum_step_);
}

}  // namespace cpu
}  // namespace sbfast
