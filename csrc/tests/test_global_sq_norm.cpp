// C++ tests of the global_sq_norm CPU kernel and of its shared arithmetic.
#include <ATen/ATen.h>

#include "check.h"
#include "cpu/kernels.h"
#include "sbfast_math.h"

int main() {
  using sbfast::math::square_accumulate;
  SBFAST_CHECK(square_accumulate<float>(1.0f, 3.0f) == 10.0f);
  SBFAST_CHECK(square_accumulate<double>(0.0, -2.5) == 6.25);

  for (int64_t n : {1, 7, 129, 4097, 1 << 20}) {
    const at::Tensor x = at::randn({n}, at::kFloat);
    const double exact = x.to(at::kDouble).pow(2).sum().item<double>();
    SBFAST_CHECK_CLOSE(sbfast::cpu::global_sq_norm({x}).item<double>(), exact, 1e-6);
    const at::Tensor xd = x.to(at::kDouble);
    SBFAST_CHECK_CLOSE(sbfast::cpu::global_sq_norm({xd}).item<double>(), exact, 1e-13);
    const at::Tensor xb = x.to(at::kBFloat16);
    const double exact_b = xb.to(at::kDouble).pow(2).sum().item<double>();
    SBFAST_CHECK_CLOSE(sbfast::cpu::global_sq_norm({xb}).item<double>(), exact_b, 1e-6);
  }
  // Several tensors, an empty one among them, and a non-contiguous one.
  const at::Tensor a = at::randn({7, 3}), b = at::empty({0}), c = at::randn({33, 64}).t();
  const double exact = a.to(at::kDouble).pow(2).sum().item<double>() + c.to(at::kDouble).pow(2).sum().item<double>();
  const at::Tensor out = sbfast::cpu::global_sq_norm({a, b, c});
  SBFAST_CHECK(out.dim() == 0 && out.scalar_type() == at::kFloat);
  SBFAST_CHECK_CLOSE(out.item<double>(), exact, 1e-6);
  // float64 anywhere makes the result float64.
  SBFAST_CHECK(sbfast::cpu::global_sq_norm({a, a.to(at::kDouble)}).scalar_type() == at::kDouble);
  return sbfast_test::report("test_global_sq_norm");
}
