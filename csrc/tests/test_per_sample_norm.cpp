// C++ tests of the per-sample gradient-norm kernels: both forms against the
// per-sample gradient formed explicitly, ||G_i^T A_i||_F^2.
#include <ATen/ATen.h>

#include "check.h"
#include "cpu/kernels.h"

int main() {
  for (int64_t t : {1, 7}) {
    for (int64_t d : {1, 7, 33}) {
      for (int64_t p : {1, 7, 33}) {
        const at::Tensor a = at::randn({3, t, d}, at::kDouble), g = at::randn({3, t, p}, at::kDouble);
        const at::Tensor exact = at::bmm(g.transpose(1, 2), a).pow(2).sum({1, 2});  // [B]
        SBFAST_CHECK(at::allclose(sbfast::cpu::per_sample_grad_sq_norm_direct(a, g), exact, 1e-12, 1e-12));
        SBFAST_CHECK(at::allclose(sbfast::cpu::per_sample_grad_sq_norm_gram(a, g), exact, 1e-12, 1e-12));
        const at::Tensor direct32 = sbfast::cpu::per_sample_grad_sq_norm_direct(a.to(at::kFloat), g.to(at::kFloat));
        SBFAST_CHECK(direct32.scalar_type() == at::kFloat);
        SBFAST_CHECK(at::allclose(direct32.to(at::kDouble), exact, 1e-5, 1e-6));
      }
    }
  }
  // A convolution's weight gradient per sample, formed with at::convolution_backward one
  // sample at a time.
  const at::Tensor x = at::randn({2, 4, 9, 9}, at::kDouble), w = at::randn({6, 2, 3, 3}, at::kDouble);
  const std::vector<int64_t> stride = {2, 1}, padding = {1, 0}, dilation = {1, 2};
  const at::Tensor out = at::conv2d(x, w, {}, stride, padding, dilation, /*groups=*/2);
  const at::Tensor gout = at::randn(out.sizes(), at::kDouble);
  std::vector<at::Tensor> per_sample;
  for (int64_t i = 0; i < 2; ++i) {
    const auto grads = at::convolution_backward(gout.narrow(0, i, 1), x.narrow(0, i, 1), w, std::nullopt, stride,
                                                padding, dilation, false, {0, 0}, 2, {false, true, false});
    per_sample.push_back(std::get<1>(grads).pow(2).sum());
  }
  const at::Tensor got = sbfast::cpu::per_sample_conv_grad_sq_norm(x, gout, w.sizes(), stride, padding, dilation, 2);
  SBFAST_CHECK(at::allclose(got, at::stack(per_sample), 1e-12, 1e-12));
  return sbfast_test::report("test_per_sample_norm");
}
