// Argument checks shared by the CPU and CUDA kernels of the fused SAM passes: the same op
// contract, so the same checks, whichever device runs it.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace sbfast {
namespace sam_checks {

// A flat run that a SAM pass reads or writes beside `param`: same device, dtype and length,
// dense and contiguous.
inline void check_array(const at::Tensor& t, const at::Tensor& param, const char* op, const char* name) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, " is on ", t.device(), ", param on ", param.device());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " must be a dense (strided) tensor");
  TORCH_CHECK(t.scalar_type() == param.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", param has ", param.scalar_type());
  TORCH_CHECK(t.numel() == param.numel(), op, ": ", name, " has ", t.numel(), " elements, param has ",
              param.numel());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// The arrays of sam_restore_sgd_ (param itself is checked by the caller, per device).
// Returns whether momentum is on.
inline bool check_restore_sgd_arrays(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                                     const at::Tensor& grad, const std::optional<at::Tensor>& normal_grad,
                                     const std::optional<at::Tensor>& momentum_buf,
                                     const std::optional<at::Tensor>& momentum_ready, double momentum,
                                     bool write_grad_sum, const char* op) {
  if (backup) check_array(*backup, param, op, "backup");
  check_array(grad, param, op, "grad");
  if (normal_grad) check_array(*normal_grad, param, op, "normal_grad");
  TORCH_CHECK(!write_grad_sum || normal_grad, op, ": write_grad_sum needs a normal_grad");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || (momentum_buf && momentum_ready), op,
              ": momentum != 0 needs momentum_buf and momentum_ready");
  if (has_momentum) {
    check_array(*momentum_buf, param, op, "momentum_buf");
    TORCH_CHECK(momentum_ready->device() == param.device() && momentum_ready->scalar_type() == at::kByte &&
                    momentum_ready->numel() >= 1 && momentum_ready->is_contiguous(),
                op, ": momentum_ready must be a contiguous uint8 tensor with >= 1 element on the param's device");
  }
  return has_momentum;
}

}  // namespace sam_checks
}  // namespace sbfast
