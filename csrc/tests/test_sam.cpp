// C++ tests of the fused SAM passes on the CPU, against the same steps written with
// ATen ops: the perturbation, the exact restore, and two SGD steps with momentum.
#include <ATen/ATen.h>

#include "check.h"
#include "cpu/kernels.h"
#include "sbfast_math.h"

int main() {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  for (int64_t n : {1, 7, 129, 4097}) {
    const at::Tensor w0 = at::randn({n}, f64), g = at::randn({n}, f64), g_normal = at::randn({n}, f64);
    for (bool adaptive : {false, true}) {
      at::Tensor w = w0.clone(), backup = at::empty_like(w0);
      const at::Tensor scale = at::scalar_tensor(0.05 / (g.norm().item<double>() + 1e-12), f64);
      sbfast::cpu::sam_perturb_(w, backup, g, scale, adaptive);
      const at::Tensor e = (adaptive ? w0.pow(2) * g : g) * scale;
      SBFAST_CHECK(at::equal(backup, w0));
      SBFAST_CHECK(at::allclose(w, w0 + e, 1e-14, 0.0));

      // Restore + SGD (lr 0.1, wd 5e-4, momentum 0.9), twice: the first step sets buf = d.
      const double lr = 0.1, wd = 5e-4, momentum = 0.9;
      at::Tensor buf = at::zeros_like(w0), ready = at::zeros({1}, at::kByte), grad = g.clone();
      at::Tensor w_ref = w0.clone(), buf_ref;
      for (int step = 0; step < 2; ++step) {
        sbfast::cpu::sam_restore_sgd_(w, backup, grad, g_normal, buf, ready, at::scalar_tensor(lr, f64),
                                      at::scalar_tensor(0.0, f64), at::scalar_tensor(1.0, f64), wd, momentum,
                                      /*dampening=*/0.0, /*nesterov=*/false, /*write_grad_sum=*/false);
        const at::Tensor d = g + g_normal + wd * w_ref;
        buf_ref = step == 0 ? d : momentum * buf_ref + d;
        w_ref = w_ref - lr * buf_ref;
        SBFAST_CHECK(at::allclose(w, w_ref, 1e-13, 1e-15));
        SBFAST_CHECK(at::allclose(buf, buf_ref, 1e-13, 1e-15));
        SBFAST_CHECK(ready.item<uint8_t>() == 1);
        backup.copy_(w);  // the next step restores to where this one ended
      }
      // A skipped step only restores: w = backup, buffers untouched.
      const at::Tensor buf_before = buf.clone();
      w.add_(1.0);
      sbfast::cpu::sam_restore_sgd_(w, backup, grad, g_normal, buf, ready, at::scalar_tensor(lr, f64),
                                    at::scalar_tensor(1.0, f64), at::scalar_tensor(1.0, f64), wd, momentum, 0.0,
                                    false, false);
      SBFAST_CHECK(at::equal(w, backup));
      SBFAST_CHECK(at::equal(buf, buf_before));
    }
  }
  return sbfast_test::report("test_sam");
}
