// Declarations of the CPU kernels, so that the C++ unit tests (csrc/tests) can call them
// directly, without the Python-defined op schemas.
#pragma once

#include <ATen/ATen.h>

namespace sbfast {
namespace cpu {

// sum over tensors of sum_i t_i^2; float64 if any input is float64, else float32.
at::Tensor global_sq_norm(at::TensorList tensors);

// [K] out[k] = sum_j (z_j s_j)^2 / (1 + 2 lambda_k s_j^2)^2 for s = inv_scale (z's shape and
// dtype); float64 if z is float64, else float32.
at::Tensor ellipsoid_sq_norms(const at::Tensor& z, const at::Tensor& inv_scale, at::ArrayRef<double> lambdas);

// In place over contiguous runs of one dtype and length: u = z / (1 + lmbd two_inv2) (lmbd = 0:
// u = z), z = lerp(prev, u, momentum), point = w0 + z (APGD's step after its projection).
void ellipsoid_momentum_step_(const at::Tensor& z, const at::Tensor& point, const at::Tensor& two_inv2,
                              const at::Tensor& prev, const at::Tensor& w0, double lmbd, double momentum);

// Bool [M, N]: per row of floating scores [M, N], the k smallest (0 <= k <= N), ties
// by ascending index (a stable sort's first k; -0.0 == +0.0, NaN largest).
at::Tensor ksmallest_mask(const at::Tensor& scores, int64_t k);
// Bool [M, N] SAM masks from the flat sets flat_mask [M, N] (bool): variant 0 = balance
// (A_i | R_i), 1 = boost (A_i | (R minus R_i)); R in ascending index, R_i = R[i::M].
at::Tensor sharpbalance_masks(const at::Tensor& flat_mask, int64_t variant);

// Fused SAM optimizer passes over one contiguous flat run (in place, no return):
// backup = w; w = w + (adaptive ? w^2 g : g) * s, with s = scale (0-d; s == 0 leaves w as is).
void sam_perturb_(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                  const at::Tensor& scale, bool adaptive);
// w = backup (or w); g = (grad [+ normal_grad]) * inv_scale; one torch.optim.SGD step
// (first step of the buffers when momentum_ready[0] == 0, then momentum_ready = 1); skip != 0:
// only the restore. write_grad_sum stores grad + normal_grad into grad.
void sam_restore_sgd_(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                      const at::Tensor& grad, const std::optional<at::Tensor>& normal_grad,
                      const std::optional<at::Tensor>& momentum_buf,
                      const std::optional<at::Tensor>& momentum_ready, const at::Tensor& lr,
                      const at::Tensor& skip, const at::Tensor& inv_scale, double weight_decay,
                      double momentum, double dampening, bool nesterov, bool write_grad_sum);

// [B] per-sample ||G_i^T A_i||_F^2 for a [B, T, d], g [B, T, p] (float64 if either is
// float64, else float32): by one GEMM per sample (direct) or by the Gram identity (gram).
at::Tensor per_sample_grad_sq_norm_direct(const at::Tensor& a, const at::Tensor& g);
at::Tensor per_sample_grad_sq_norm_gram(const at::Tensor& a, const at::Tensor& g);
// [B] per-sample squared norm of a 1-D/2-D convolution's weight gradient (x already
// padded as the convolution sees it but for `padding` zeros).
at::Tensor per_sample_conv_grad_sq_norm(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups);

}  // namespace cpu
}  // namespace sbfast
