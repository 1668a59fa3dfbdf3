// C++ tests of the ellipsoid_sq_norms CPU kernel and of its shared arithmetic.
#include <ATen/ATen.h>

#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "sbfast_math.h"

namespace {
// out[k] in float64 from the definition.
double exact(const at::Tensor& z, const at::Tensor& s, double lam) {
  const at::Tensor zd = z.to(at::kDouble), sd = s.to(at::kDouble);
  return ((zd * sd).pow(2) / (1 + lam * 2 * sd.pow(2)).pow(2)).sum().item<double>();
}
}  // namespace

int main() {
  using sbfast::math::ellipsoid_a;
  using sbfast::math::ellipsoid_b;
  using sbfast::math::ellipsoid_term;
  SBFAST_CHECK(ellipsoid_a<float>(3.0f, 0.5f) == 2.25f);
  SBFAST_CHECK(ellipsoid_b<double>(0.5) == 0.5);
  SBFAST_CHECK(ellipsoid_term<double>(2.25, 0.5, 2.0) == 0.5625);  // 2.25 / (1 + 1)^2

  const std::vector<double> lambdas = {0.0, 0.1, 7.5, 1e3};
  for (int64_t n : {0, 1, 7, 129, 2048, 2049, 1 << 20}) {
    const at::Tensor z = at::randn({n}, at::kFloat);
    const at::Tensor s = at::rand({n}, at::kFloat) * 20;
    const at::Tensor out = sbfast::cpu::ellipsoid_sq_norms(z, s, lambdas);
    SBFAST_CHECK(out.dim() == 1 && out.size(0) == 4 && out.scalar_type() == at::kFloat);
    const at::Tensor out_d = sbfast::cpu::ellipsoid_sq_norms(z.to(at::kDouble), s.to(at::kDouble), lambdas);
    SBFAST_CHECK(out_d.scalar_type() == at::kDouble);
    for (size_t k = 0; k < lambdas.size(); ++k) {
      const double want = exact(z, s, lambdas[k]);
      SBFAST_CHECK_CLOSE(out[k].item<double>() / std::fmax(1.0, want), want / std::fmax(1.0, want), 1e-6);
      SBFAST_CHECK_CLOSE(out_d[k].item<double>() / std::fmax(1.0, want), want / std::fmax(1.0, want), 1e-13);
    }
  }
  // A non-contiguous pair and half precision (computed in float32).
  const at::Tensor z = at::randn({64, 33}).t(), s = at::rand({64, 33}).t();
  SBFAST_CHECK_CLOSE(sbfast::cpu::ellipsoid_sq_norms(z, s, {0.5})[0].item<double>(), exact(z, s, 0.5), 1e-6);
  const at::Tensor zh = z.to(at::kHalf), sh = s.to(at::kHalf);
  SBFAST_CHECK(sbfast::cpu::ellipsoid_sq_norms(zh, sh, {0.5}).scalar_type() == at::kFloat);
  SBFAST_CHECK_CLOSE(sbfast::cpu::ellipsoid_sq_norms(zh, sh, {0.5})[0].item<double>(), exact(zh, sh, 0.5), 1e-6);
  return sbfast_test::report("test_ellipsoid_sq_norms");
}
