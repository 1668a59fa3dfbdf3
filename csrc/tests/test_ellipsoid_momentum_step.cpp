// C++ tests of the ellipsoid_momentum_step_ CPU kernel and of its shared arithmetic: the kernel
// gives the bits of the torch ops it replaces (mul, add, div, lerp, add) in float32 and float64.
#include <ATen/ATen.h>

#include "check.h"
#include "cpu/kernels.h"
#include "sbfast_math.h"

namespace {
// The torch ops the measure ran before the op: u = z / (t lambda + 1), v = lerp(prev, u, m), w0 + v.
void torch_ops(const at::Tensor& z, const at::Tensor& t, const at::Tensor& prev, const at::Tensor& w0, double lmbd,
               double m, at::Tensor* v, at::Tensor* point) {
  const at::Tensor u = lmbd == 0 ? z : z / at::mul(t, lmbd).add_(1);
  *v = at::lerp(prev, u, m);
  *point = at::add(w0, *v);
}
}  // namespace

int main() {
  using sbfast::math::ellipsoid_projected;
  using sbfast::math::momentum_lerp;
  SBFAST_CHECK(ellipsoid_projected<double>(3.0, 0.5, 4.0) == 1.0);  // 3 / (0.5 * 4 + 1)
  SBFAST_CHECK(ellipsoid_projected<float>(3.0f, 1.0f / 0.0f, 0.0f) == 3.0f);  // inside: not divided
  SBFAST_CHECK(momentum_lerp<double>(1.0, 5.0, 0.75) == 4.0);
  SBFAST_CHECK(momentum_lerp<double>(1.0, 5.0, 0.25) == 2.0);

  for (at::ScalarType dtype : {at::kFloat, at::kDouble}) {
    for (int64_t n : {0, 1, 7, 129, 4097, 1 << 20}) {
      const auto opts = at::TensorOptions().dtype(dtype);
      const at::Tensor w0 = at::randn({n}, opts) * 0.1;
      const at::Tensor t = 2 / (w0.abs() + 1e-3).pow(2);
      const at::Tensor prev = at::randn({n}, opts) * 0.1;
      const at::Tensor z0 = at::randn({n}, opts) * 0.1;
      for (double lmbd : {0.0, 0.37, 2.5e3}) {
        for (double m : {0.75, 0.25, 1.0}) {
          at::Tensor z = z0.clone(), point = at::empty_like(z0), v, want_point;
          sbfast::cpu::ellipsoid_momentum_step_(z, point, t, prev, w0, lmbd, m);
          torch_ops(z0, t, prev, w0, lmbd, m, &v, &want_point);
          SBFAST_CHECK(at::equal(z, v));
          SBFAST_CHECK(at::equal(point, want_point));
        }
      }
    }
  }
  // bfloat16 computes in float32 and rounds once: within one bfloat16 ulp of the float32 result.
  const at::Tensor w0 = at::randn({129}) * 0.1, t = 2 / (w0.abs() + 1e-3).pow(2);
  const at::Tensor prev = at::randn({129}) * 0.1, z0 = at::randn({129}) * 0.1;
  at::Tensor zb = z0.to(at::kBFloat16), pb = at::empty_like(zb), v, point;
  sbfast::cpu::ellipsoid_momentum_step_(zb, pb, t.to(at::kBFloat16), prev.to(at::kBFloat16), w0.to(at::kBFloat16),
                                        0.37, 0.75);
  torch_ops(z0.to(at::kBFloat16).to(at::kFloat), t.to(at::kBFloat16).to(at::kFloat),
            prev.to(at::kBFloat16).to(at::kFloat), w0.to(at::kBFloat16).to(at::kFloat), 0.37, 0.75, &v, &point);
  SBFAST_CHECK((zb.to(at::kFloat) - v).abs().le(v.abs() * (1.0 / 128) + 1e-30).all().item<bool>());
  return sbfast_test::report("test_ellipsoid_momentum_step");
}
