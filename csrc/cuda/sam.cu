// CUDA kernels of the fused SAM optimizer: sbfast::sam_perturb_ and sbfast::sam_restore_sgd_,
// one grid-stride pass over a contiguous run of a flat buffer each.
//
// Already one launch per run, not per tensor: SharpBalanceSAM (sbfast/optim.py) keeps every
// parameter, gradient, backup and momentum buffer in one flat buffer per dtype and calls these
// ops once per run of consecutive parameters that share a param group and a phase (one run per
// dtype and group in a plain step), so a multi-tensor table would add nothing here.
//
// The per-element arithmetic is sbfast_math.h's, shared with the CPU kernels (which the CPU
// tests check bit for bit against torch); the _rn intrinsics there keep nvcc from contracting.
// Every scalar that may change between steps (the SAM scale, lr, the skip flag, the GradScaler's
// inverse scale, the momentum buffers' first-step flag) is read from device memory by the
// kernel, never from the host, so a step can be captured in a CUDA graph once and replayed
// with new values. Launch parameters depend only on sizes.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "../checks.h"
#include "../sbfast_math.h"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

template <typename scalar_t>
using compute_t = typename math::acc_type<scalar_t>::type;

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocks, (n + kThreads * 4 - 1) / (kThreads * 4)));
}

// The device scalars arrive as float32 or float64 tensors; read either as double.
struct DeviceScalar {
  const void* ptr;
  bool is_double;
  __device__ __forceinline__ double get() const {
    return is_double ? *static_cast<const double*>(ptr) : static_cast<double>(*static_cast<const float*>(ptr));
  }
};

DeviceScalar device_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64 on the device, got ", t.scalar_type());
  return DeviceScalar{t.const_data_ptr(), t.scalar_type() == at::kDouble};
}

template <typename scalar_t>
__global__ void perturb_kernel(scalar_t* __restrict__ w, scalar_t* __restrict__ backup,
                               const scalar_t* __restrict__ g, DeviceScalar scale, bool adaptive,
                               int64_t n) {
  using T = compute_t<scalar_t>;
  const T s = static_cast<T>(scale.get());
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t wi = w[i];
    backup[i] = wi;
    if (s != T(0)) {
      w[i] = static_cast<scalar_t>(math::sam_perturbed_weight<T>(static_cast<T>(wi), static_cast<T>(g[i]), s, adaptive));
    }
  }
}

struct SgdArgs {
  DeviceScalar lr;
  DeviceScalar skip;
  DeviceScalar inv_scale;
  const uint8_t* ready;  // nullptr without momentum
  double weight_decay;
  double momentum;
  double one_minus_dampening;
  bool nesterov;
};

template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
__global__ void restore_sgd_kernel(scalar_t* w, const scalar_t* src, scalar_t* __restrict__ grad,
                                   const scalar_t* __restrict__ normal, scalar_t* __restrict__ buf, SgdArgs a,
                                   int64_t n) {
  using T = compute_t<scalar_t>;
  const bool skipped = a.skip.get() != 0.0;
  const T inv_scale = static_cast<T>(a.inv_scale.get());
  const T neg_lr = static_cast<T>(-a.lr.get());
  const T weight_decay = static_cast<T>(a.weight_decay);
  const T momentum = static_cast<T>(a.momentum);
  const T one_minus_dampening = static_cast<T>(a.one_minus_dampening);
  const bool first = HasMomentum && a.ready[0] == 0;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const scalar_t w0_raw = src[i];
    if (skipped) {
      w[i] = w0_raw;
      continue;
    }
    const T w0 = static_cast<T>(w0_raw);
    T g = static_cast<T>(grad[i]);
    if constexpr (HasNormal) {
      g = math::add_rn(g, static_cast<T>(normal[i]));
      if constexpr (WriteSum) grad[i] = static_cast<scalar_t>(g);
    }
    g = math::mul_rn(g, inv_scale);
    T d = a.weight_decay != 0.0 ? math::sgd_weight_decay(g, w0, weight_decay) : g;
    if constexpr (HasMomentum) {
      const T b = first ? d : math::sgd_momentum(static_cast<T>(buf[i]), d, momentum, one_minus_dampening);
      buf[i] = static_cast<scalar_t>(b);
      d = a.nesterov ? math::sgd_nesterov(d, b, momentum) : b;
    }
    w[i] = static_cast<scalar_t>(math::sgd_apply(w0, d, neg_lr));
  }
}

// Its own launch after the step, so that no block of the step can still read the flag.
__global__ void mark_ready_kernel(uint8_t* ready, DeviceScalar skip, int64_t n) {
  if (skip.get() != 0.0) return;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ready[i] = 1;
}


template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
void launch_restore(scalar_t* w, const scalar_t* src, scalar_t* grad, const scalar_t* normal, scalar_t* buf,
                    const SgdArgs& a, int64_t n, cudaStream_t stream) {
  restore_sgd_kernel<scalar_t, HasNormal, WriteSum, HasMomentum>
      <<<blocks_for(n), kThreads, 0, stream>>>(w, src, grad, normal, buf, a, n);
}

}  // namespace

void sam_perturb_(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                  const at::Tensor& scale, bool adaptive) {
  constexpr const char* op = "sbfast::sam_perturb_";
  checks::sam_param(param, c10::DeviceType::CUDA, op);
  checks::like_param(backup, param, op, "backup");
  checks::like_param(grad, param, op, "grad");
  TORCH_CHECK(scale.device() == param.device(), op, ": scale is on ", scale.device(), ", param on ",
              param.device());
  const DeviceScalar s = device_scalar(scale, op, "scale");
  const int64_t n = param.numel();
  if (n == 0) return;
  const at::cuda::CUDAGuard guard(param.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_perturb_cuda", [&] {
    perturb_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        param.mutable_data_ptr<scalar_t>(), backup.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        s, adaptive, n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sam_restore_sgd_(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                      const at::Tensor& grad, const std::optional<at::Tensor>& normal_grad,
                      const std::optional<at::Tensor>& momentum_buf,
                      const std::optional<at::Tensor>& momentum_ready, const at::Tensor& lr,
                      const at::Tensor& skip, const at::Tensor& inv_scale, double weight_decay,
                      double momentum, double dampening, bool nesterov, bool write_grad_sum) {
  constexpr const char* op = "sbfast::sam_restore_sgd_";
  checks::sam_param(param, c10::DeviceType::CUDA, op);
  const bool has_momentum = checks::restore_sgd_arrays(
      param, backup, grad, normal_grad, momentum_buf, momentum_ready, momentum, write_grad_sum, op);
  for (const at::Tensor* t : {&lr, &skip, &inv_scale}) {
    TORCH_CHECK(t->device() == param.device(), op, ": lr, skip and inv_scale must be on ", param.device(),
                ", got ", t->device());
  }
  SgdArgs a{device_scalar(lr, op, "lr"),
            device_scalar(skip, op, "skip"),
            device_scalar(inv_scale, op, "inv_scale"),
            has_momentum ? momentum_ready->const_data_ptr<uint8_t>() : nullptr,
            weight_decay,
            momentum,
            1.0 - dampening,
            nesterov};
  const int64_t n = param.numel();
  const at::cuda::CUDAGuard guard(param.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_restore_sgd_cuda", [&] {
      scalar_t* w = param.mutable_data_ptr<scalar_t>();
      const scalar_t* src = backup ? backup->const_data_ptr<scalar_t>() : w;
      scalar_t* g = grad.mutable_data_ptr<scalar_t>();
      const scalar_t* gn = normal_grad ? normal_grad->const_data_ptr<scalar_t>() : nullptr;
      scalar_t* buf = has_momentum ? momentum_buf->mutable_data_ptr<scalar_t>() : nullptr;
      if (has_momentum) {
        if (!gn) launch_restore<scalar_t, false, false, true>(w, src, g, gn, buf, a, n, stream);
        else if (write_grad_sum) launch_restore<scalar_t, true, true, true>(w, src, g, gn, buf, a, n, stream);
        else launch_restore<scalar_t, true, false, true>(w, src, g, gn, buf, a, n, stream);
      } else {
        if (!gn) launch_restore<scalar_t, false, false, false>(w, src, g, gn, buf, a, n, stream);
        else if (write_grad_sum) launch_restore<scalar_t, true, true, false>(w, src, g, gn, buf, a, n, stream);
        else launch_restore<scalar_t, true, false, false>(w, src, g, gn, buf, a, n, stream);
      }
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (has_momentum) {
    mark_ready_kernel<<<1, kThreads, 0, stream>>>(momentum_ready->mutable_data_ptr<uint8_t>(), a.skip,
                                                   momentum_ready->numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("sam_perturb_", &sam_perturb_);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_);
}

}  // namespace cuda
}  // namespace sbfast
