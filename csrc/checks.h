// Argument checks shared by every C++ face (csrc/cpu and csrc/cuda): one op contract, so one
// set of checks and one wording, whichever device runs it. Each check names the op, the
// offending argument and what was expected, in one line (TORCH_CHECK raises RuntimeError).
//
// The Python wrappers (sbfast/ops.py) validate first and raise ValueError/TypeError; these
// checks are what stands between a direct torch.ops.sbfast call and a wrong memory access.
// Contiguity: a kernel that indexes raw pointers either refuses a non-contiguous input here or
// takes a contiguous copy itself (and says so in its file); it never indexes strided memory as
// dense.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>

namespace sbfast {
namespace checks {

// The kernel of `op` serves `device_type` only (the dispatcher guarantees it for the first
// tensor argument; the others are checked with same_device).
inline void on_device(const at::Tensor& t, c10::DeviceType device_type, const char* op, const char* name) {
  TORCH_CHECK(t.device().type() == device_type, op, " (", c10::DeviceTypeName(device_type, /*lower_case=*/false),
              " kernel): ", name, " is on ", t.device());
}

// `t` lives where `ref` does (same device type and index).
inline void same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                        const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", ", ref_name, " on ",
              ref.device(), " (expected one device)");
}

// Dense storage: no sparse or other layouts (their data pointer is not the values).
inline void strided(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor, got layout ",
              t.layout());
}

// float64, float32, float16 or bfloat16.
inline void floating(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be floating (float64, float32, float16 or bfloat16), got ", t.scalar_type());
}

inline void dtype_is(const at::Tensor& t, at::ScalarType dtype, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

inline void dim_is(const at::Tensor& t, int64_t dim, const char* op, const char* name, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

inline void contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (strides ", t.strides(), " for shape ",
              t.sizes(), ")");
}

// A 0-d/one-element device scalar read by the kernel itself (lr, skip, scale, ...).
inline void one_element(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
}

// A flat run that a pass reads or writes beside `param` (named `param_name` in the messages):
// same device, dtype and length, dense and contiguous.
inline void like_param(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name,
                       const char* param_name = "param") {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " is on ", t.device(), ", ", param_name, " on ",
              param.device());
  strided(t, op, name);
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), ", ",
              param_name, " has ", param.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), op, ": ", name, " has ", t.numel(), " elements, ", param_name, " has ",
              param.numel());
  contiguous(t, op, name);
}

// ---- per op: the contract of each op, shared by its CPU and CUDA kernels -------------------

// global_sq_norm: a non-empty list of dense floating tensors on one device (any strides: the
// kernels take contiguous copies of strided ones).
inline void global_sq_norm_inputs(at::TensorList tensors, c10::DeviceType device_type, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": empty tensor list");
  on_device(tensors[0], device_type, op, "tensors[0]");
  for (const auto& t : tensors) {
    same_device(t, tensors[0], op, "a tensor", "tensors[0]");
    strided(t, op, "every tensor");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": expected floating tensors, got ", t.scalar_type());
  }
}

// ellipsoid_momentum_step_: z, point, two_inv2, prev and w0 contiguous floating runs of one
// dtype, length and device (z and point two buffers); lmbd finite >= 0, momentum in [0, 1].
inline void ellipsoid_momentum_step_inputs(const at::Tensor& z, const at::Tensor& point, const at::Tensor& two_inv2,
                                           const at::Tensor& prev, const at::Tensor& w0, double lmbd, double momentum,
                                           c10::DeviceType device_type, const char* op) {
  on_device(z, device_type, op, "z");
  strided(z, op, "z");
  floating(z, op, "z");
  contiguous(z, op, "z");
  like_param(point, z, op, "point", "z");
  like_param(two_inv2, z, op, "two_inv2", "z");
  like_param(prev, z, op, "prev", "z");
  like_param(w0, z, op, "w0", "z");
  TORCH_CHECK(z.numel() == 0 || point.data_ptr() != z.data_ptr(), op,
              ": point and z are the same memory; expected two buffers");
  TORCH_CHECK(lmbd >= 0 && lmbd <= std::numeric_limits<double>::max(), op, ": lmbd ", lmbd,
              ", expected a finite number >= 0");
  TORCH_CHECK(momentum >= 0 && momentum <= 1, op, ": momentum ", momentum, ", expected a number in [0, 1]");
}

// ellipsoid_sq_norms: z and inv_scale floating, of one shape, dtype and device (any strides: the
// kernels read contiguous copies); 1 to 64 finite lambdas >= 0.
constexpr int64_t kMaxEllipsoidLambdas = 64;
inline void ellipsoid_sq_norms_inputs(const at::Tensor& z, const at::Tensor& inv_scale, at::ArrayRef<double> lambdas,
                                      c10::DeviceType device_type, const char* op) {
  on_device(z, device_type, op, "z");
  same_device(inv_scale, z, op, "inv_scale", "z");
  strided(z, op, "z");
  strided(inv_scale, op, "inv_scale");
  floating(z, op, "z");
  dtype_is(inv_scale, z.scalar_type(), op, "inv_scale");
  TORCH_CHECK(inv_scale.sizes() == z.sizes(), op, ": inv_scale has shape ", inv_scale.sizes(), ", z has ", z.sizes());
  TORCH_CHECK(!lambdas.empty() && static_cast<int64_t>(lambdas.size()) <= kMaxEllipsoidLambdas, op, ": ",
              lambdas.size(), " lambdas, expected 1 to ", kMaxEllipsoidLambdas);
  for (double lam : lambdas) {
    TORCH_CHECK(lam >= 0 && lam <= std::numeric_limits<double>::max(), op, ": lambda ", lam,
                ", expected a finite number >= 0");
  }
}

// per_sample_grad_sq_norm_*: a [B, T, d] and g [B, T, p], floating, one device (any strides).
inline void per_sample_pair(const at::Tensor& a, const at::Tensor& g, c10::DeviceType device_type, const char* op) {
  on_device(a, device_type, op, "a");
  same_device(g, a, op, "g", "a");
  strided(a, op, "a");
  strided(g, op, "g");
  TORCH_CHECK(a.dim() == 3 && g.dim() == 3, op, ": expected a [B, T, d] and g [B, T, p], got ", a.sizes(), " and ",
              g.sizes());
  TORCH_CHECK(a.size(0) == g.size(0) && a.size(1) == g.size(1), op, ": a ", a.sizes(), " and g ", g.sizes(),
              " differ in B or T");
  TORCH_CHECK(at::isFloatingType(a.scalar_type()) && at::isFloatingType(g.scalar_type()), op,
              ": expected floating tensors, got ", a.scalar_type(), " and ", g.scalar_type());
}

// per_sample_conv_grad_sq_norm: x [B, C_in, *S], g [B, C_out, *S'] with 1 or 2 spatial dims,
// a weight of the same rank, one stride/padding/dilation entry per spatial dim, groups that
// divide both channel counts. The spatial sizes are checked by the kernels (they derive them).
inline void conv_inputs(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef weight_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                        c10::DeviceType device_type, const char* op) {
  on_device(x, device_type, op, "x");
  same_device(g, x, op, "g", "x");
  strided(x, op, "x");
  strided(g, op, "g");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(g.scalar_type()), op,
              ": expected floating tensors, got ", x.scalar_type(), " and ", g.scalar_type());
  const int64_t spatial = x.dim() - 2;
  TORCH_CHECK((spatial == 1 || spatial == 2) && g.dim() == x.dim() &&
                  static_cast<int64_t>(weight_size.size()) == x.dim(),
              op, ": x ", x.sizes(), ", g ", g.sizes(), ", weight ", weight_size,
              ": expected x [B, C_in, *S], g [B, C_out, *S'] (1 or 2 spatial dims) and a weight of the same rank");
  TORCH_CHECK(static_cast<int64_t>(stride.size()) == spatial && static_cast<int64_t>(padding.size()) == spatial &&
                  static_cast<int64_t>(dilation.size()) == spatial,
              op, ": stride, padding and dilation need ", spatial, " entries");
  for (int64_t s = 0; s < spatial; ++s) {
    TORCH_CHECK(stride[s] >= 1 && dilation[s] >= 1 && padding[s] >= 0 && weight_size[2 + s] >= 1, op,
                ": stride ", stride, ", dilation ", dilation, " (>= 1), padding ", padding, " (>= 0) and kernel ",
                weight_size, " (>= 1) are not a convolution");
  }
  TORCH_CHECK(groups >= 1 && x.size(0) == g.size(0) && weight_size[0] == g.size(1) &&
                  weight_size[1] * groups == x.size(1) && g.size(1) % groups == 0,
              op, ": x ", x.sizes(), ", g ", g.sizes(), ", weight ", weight_size, " and groups=", groups,
              " do not fit one convolution");
}

// ksmallest_mask: floating scores [M, N] and 0 <= k <= N (any strides: contiguous copy).
inline void ksmallest_inputs(const at::Tensor& scores, int64_t k, c10::DeviceType device_type, const char* op) {
  on_device(scores, device_type, op, "scores");
  strided(scores, op, "scores");
  TORCH_CHECK(scores.dim() == 2, op, ": scores must be 2-D [M, N], got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()), op, ": expected floating scores, got ",
              scores.scalar_type());
  const int64_t n = scores.size(1);
  TORCH_CHECK(0 <= k && k <= n, op, ": k = ", k, " outside [0, N = ", n, "]");
}

// sharpbalance_masks: bool flat_mask [M, N], variant 0 (balance) or 1 (boost).
inline void sharpbalance_inputs(const at::Tensor& flat_mask, int64_t variant, c10::DeviceType device_type,
                                const char* op) {
  on_device(flat_mask, device_type, op, "flat_mask");
  strided(flat_mask, op, "flat_mask");
  TORCH_CHECK(flat_mask.dim() == 2, op, ": flat_mask must be 2-D [M, N], got ", flat_mask.sizes());
  TORCH_CHECK(flat_mask.scalar_type() == at::kBool, op, ": expected a bool flat_mask, got ",
              flat_mask.scalar_type());
  TORCH_CHECK(variant == 0 || variant == 1, op, ": variant = ", variant, ", expected 0 (balance) or 1 (boost)");
}

// sam_perturb_ / sam_restore_sgd_: param itself is dense, floating and contiguous on the
// kernel's device; every other array is like_param.
inline void sam_param(const at::Tensor& param, c10::DeviceType device_type, const char* op) {
  on_device(param, device_type, op, "param");
  strided(param, op, "param");
  floating(param, op, "param");
  contiguous(param, op, "param");
}

// The arrays of sam_restore_sgd_ (param itself: sam_param). Returns whether momentum is on.
inline bool restore_sgd_arrays(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                               const at::Tensor& grad, const std::optional<at::Tensor>& normal_grad,
                               const std::optional<at::Tensor>& momentum_buf,
                               const std::optional<at::Tensor>& momentum_ready, double momentum,
                               bool write_grad_sum, const char* op) {
  if (backup) like_param(*backup, param, op, "backup");
  like_param(grad, param, op, "grad");
  if (normal_grad) like_param(*normal_grad, param, op, "normal_grad");
  TORCH_CHECK(!write_grad_sum || normal_grad, op, ": write_grad_sum needs a normal_grad");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || (momentum_buf && momentum_ready), op,
              ": momentum != 0 needs momentum_buf and momentum_ready");
  if (has_momentum) {
    like_param(*momentum_buf, param, op, "momentum_buf");
    TORCH_CHECK(momentum_ready->device() == param.device() && momentum_ready->layout() == at::kStrided &&
                    momentum_ready->scalar_type() == at::kByte && momentum_ready->numel() >= 1 &&
                    momentum_ready->is_contiguous(),
                op, ": momentum_ready must be a contiguous uint8 tensor with >= 1 element on the param's device");
  }
  return has_momentum;
}

}  // namespace checks
}  // namespace sbfast
