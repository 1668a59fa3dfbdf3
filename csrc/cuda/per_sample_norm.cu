// CUDA kernels of sbfast::per_sample_grad_sq_norm_direct / _gram and
// sbfast::per_sample_conv_grad_sq_norm: per-sample squared norms of a layer's weight gradient.
//
// The batched products go to cuBLAS through ATen (at::bmm_out); everything around them is
// ours: the reductions of the products to one number per sample, and the convolution's unfold.
//
// * direct: s_i = ||G_i^T A_i||_F^2: P_i = G_i^T A_i by one batched GEMM, then the sum of
//           squares of every sample's P_i (segment_sum_kernel<Dot = false>).
// * gram:   s_i = sum_{t,s} (A_i A_i^T)_{ts} (G_i G_i^T)_{ts}: two batched GEMMs, then the
//           elementwise product of the two Gram matrices summed per sample (Dot = true).
// * conv:   each sample's unfold per group (unfold_kernel, the index math of
//           math::unfold_source_offset, shared with the CPU tests), then per group the direct
//           product or the Gram form, whichever costs fewer multiply-adds
//           (math::gram_is_cheaper, sbfast.sharpness.choose_form's rule).
//
// Memory: the products are formed for a chunk of samples at a time into one workspace of at
// most kWorkspaceBytes (a single sample may exceed it), so nothing [B, p, d]-sized is ever
// allocated for large batches. Precision: half/bfloat16 inputs are computed in float32 (as the
// CPU kernel); the reductions accumulate in float64 whatever the dtype (a float product of two
// floats is exact in float64), in a fixed order (block_reduce.cuh), so results are
// bit-reproducible run to run; cuBLAS's GEMM is the only source of difference from the CPU
// kernel (tests: the 2x-plain-PyTorch rule, and a relative tolerance for the convolution).
// No host synchronisation: the ops can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../sbfast_math.h"
#include "block_reduce.cuh"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kWorkspaceBytes = int64_t{256} << 20;
constexpr int64_t kMinElementsPerBlock = static_cast<int64_t>(kThreads) * 8;

at::ScalarType acc_scalar_type(const at::Tensor& a, const at::Tensor& g) {
  return (a.scalar_type() == at::kDouble || g.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

// Samples per chunk so that the chunk's workspace (bytes_per_sample each) fits the budget.
int64_t samples_per_chunk(int64_t batch, int64_t bytes_per_sample) {
  return std::clamp<int64_t>(kWorkspaceBytes / std::max<int64_t>(1, bytes_per_sample), 1, std::max<int64_t>(1, batch));
}

// ---- segmented reduction ---------------------------------------------------------------
// `segments` runs of seg_len contiguous values, back to back; each run is split over `parts`
// blocks (so that a few large samples still fill the GPU). Block (s, q) writes the float64 sum
// of part q of segment s (of x^2, or of x * y) to partials[s * parts + q]; then one thread per
// segment adds its parts in order.
template <typename scalar_t, bool Dot>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t seg_len,
                       int64_t parts, int64_t span, double* __restrict__ partials) {
  __shared__ double scratch[kThreads];
  const int64_t block = blockIdx.x;
  const int64_t segment = block / parts, part = block - segment * parts;
  const int64_t begin = part * span;
  const int64_t end = std::min(seg_len, begin + span);
  const int64_t base = segment * seg_len;
  double acc = 0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const double xi = static_cast<double>(x[base + i]);
    if constexpr (Dot) {
      acc = math::product_accumulate<double>(acc, xi, static_cast<double>(y[base + i]));
    } else {
      acc = math::square_accumulate<double>(acc, xi);
    }
  }
  const double total = block_sum<kThreads>(acc, scratch);
  if (threadIdx.x == 0) partials[block] = total;
}

template <typename out_t>
__global__ void finish_segments_kernel(const double* __restrict__ partials, int64_t segments, int64_t parts,
                                       out_t* __restrict__ out) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (s >= segments) return;
  double total = 0;
  for (int64_t q = 0; q < parts; ++q) total += partials[s * parts + q];
  out[s] = static_cast<out_t>(total);
}

// out[s] = sum over segment s of x^2 (y undefined) or x * y; x, y contiguous, of out's dtype.
void segment_sums(const at::Tensor& x, const at::Tensor* y, int64_t segments, at::Tensor out, cudaStream_t stream) {
  if (segments == 0) return;
  const int64_t seg_len = x.numel() / segments;
  const int64_t target_blocks = 4 * sm_count();
  const int64_t parts = std::clamp<int64_t>((target_blocks + segments - 1) / segments, 1,
                                            std::max<int64_t>(1, (seg_len + kMinElementsPerBlock - 1) / kMinElementsPerBlock));
  const int64_t span = (seg_len + parts - 1) / parts;
  const int64_t blocks = segments * parts;
  TORCH_CHECK(blocks <= INT32_MAX, "sbfast: ", segments, " samples are too many for one launch");
  at::Tensor partials = at::empty({blocks}, x.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "per_sample_segment_sums", [&] {
    if (y != nullptr) {
      segment_sum_kernel<scalar_t, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), y->const_data_ptr<scalar_t>(), seg_len, parts, span,
          partials.mutable_data_ptr<double>());
    } else {
      segment_sum_kernel<scalar_t, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), nullptr, seg_len, parts, span, partials.mutable_data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_segments_kernel<scalar_t><<<static_cast<unsigned>((segments + kThreads - 1) / kThreads), kThreads, 0,
                                       stream>>>(partials.const_data_ptr<double>(), segments, parts,
                                                 out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---- unfold ------------------------------------------------------------------------------
// cols [samples, groups, d_g, t] (contiguous, acc_t) of samples [first, first + samples) of x
// [B, C_in, h, w] (contiguous, scalar_t), zero where the convolution reads its padding.
template <typename scalar_t, typename acc_t>
__global__ void unfold_kernel(const scalar_t* __restrict__ x, math::UnfoldGeometry geom, int64_t groups,
                              int64_t channels, int64_t first, int64_t total, acc_t* __restrict__ cols) {
  const int64_t t = geom.ho * geom.wo;
  const int64_t d_g = geom.c * geom.kh * geom.kw;
  const int64_t plane = geom.h * geom.w;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t col = e % t;
    const int64_t rest = e / t;
    const int64_t row = rest % d_g;
    const int64_t sample_group = rest / d_g;
    const int64_t sample = first + sample_group / groups, group = sample_group % groups;
    const int64_t offset = math::unfold_source_offset(geom, row, col);
    const scalar_t* xg = x + (sample * channels + group * geom.c) * plane;
    cols[e] = offset >= 0 ? static_cast<acc_t>(xg[offset]) : acc_t(0);
  }
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 65535 * 8));
}

// The dense per-sample Gram/direct pipeline over a batch of b "samples" a [b, T, d], g [b, T, p]
// (any strides, acc dtype), each sample's total going to out[b / per_out] summed over per_out
// consecutive samples (the groups of one convolution sample).
void products_and_sums(const at::Tensor& a, const at::Tensor& g, bool gram, int64_t per_out, at::Tensor out,
                       cudaStream_t stream) {
  const int64_t b = a.size(0), t = a.size(1), d = a.size(2), p = g.size(2);
  const int64_t elem = static_cast<int64_t>(a.element_size());
  const int64_t per_sample_bytes = elem * (gram ? 2 * t * t : p * d);
  // Whole output samples per chunk (all groups of a convolution sample in one chunk).
  const int64_t chunk_out = samples_per_chunk(b / per_out, per_sample_bytes * per_out);
  const int64_t chunk = chunk_out * per_out;
  const auto opts = a.options();
  at::Tensor ws1 = at::empty(gram ? std::vector<int64_t>{chunk, t, t} : std::vector<int64_t>{chunk, p, d}, opts);
  at::Tensor ws2 = gram ? at::empty({chunk, t, t}, opts) : at::Tensor();
  for (int64_t first = 0; first < b; first += chunk) {
    const int64_t len = std::min(chunk, b - first);
    const at::Tensor ai = a.narrow(0, first, len), gi = g.narrow(0, first, len);
    at::Tensor w1 = ws1.narrow(0, 0, len);
    at::Tensor segment_out = out.narrow(0, first / per_out, len / per_out);
    if (gram) {
      at::Tensor w2 = ws2.narrow(0, 0, len);
      at::bmm_out(w1, ai, ai.transpose(1, 2));
      at::bmm_out(w2, gi, gi.transpose(1, 2));
      segment_sums(w1, &w2, len / per_out, segment_out, stream);
    } else {
      at::bmm_out(w1, gi.transpose(1, 2), ai);
      segment_sums(w1, nullptr, len / per_out, segment_out, stream);
    }
  }
}

at::Tensor per_sample_pair_impl(const at::Tensor& a_in, const at::Tensor& g_in, bool gram, const char* op) {
  checks::per_sample_pair(a_in, g_in, c10::DeviceType::CUDA, op);
  const at::cuda::CUDAGuard guard(a_in.device());
  const at::ScalarType acc = acc_scalar_type(a_in, g_in);
  const int64_t b = a_in.size(0);
  const auto out_opts = a_in.options().dtype(acc);
  if (b == 0 || a_in.size(1) == 0 || a_in.size(2) == 0 || g_in.size(2) == 0) return at::zeros({b}, out_opts);
  at::Tensor out = at::empty({b}, out_opts);
  // half/bfloat16 products in float32; strided inputs go to cuBLAS as they are
  products_and_sums(a_in.to(acc), g_in.to(acc), gram, 1, out, at::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace

at::Tensor per_sample_grad_sq_norm_direct(const at::Tensor& a, const at::Tensor& g) {
  return per_sample_pair_impl(a, g, /*gram=*/false, "sbfast::per_sample_grad_sq_norm_direct");
}

at::Tensor per_sample_grad_sq_norm_gram(const at::Tensor& a, const at::Tensor& g) {
  return per_sample_pair_impl(a, g, /*gram=*/true, "sbfast::per_sample_grad_sq_norm_gram");
}

at::Tensor per_sample_conv_grad_sq_norm(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  constexpr const char* op = "sbfast::per_sample_conv_grad_sq_norm";
  checks::conv_inputs(x, g, weight_size, stride, padding, dilation, groups, c10::DeviceType::CUDA, op);
  const at::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = acc_scalar_type(x, g);
  const int64_t b = x.size(0);
  const auto out_opts = x.options().dtype(acc);
  if (b == 0 || x.numel() == 0 || g.numel() == 0) return at::zeros({b}, out_opts);
  // Conv1d runs as a 2-D problem with a height-1 kernel.
  const bool one = x.dim() == 3;
  const at::Tensor xc = (one ? x.unsqueeze(2) : x).contiguous();  // unfold_kernel indexes it densely
  const at::Tensor gc = (one ? g.unsqueeze(2) : g).to(acc).contiguous();
  math::UnfoldGeometry geom{};
  geom.c = xc.size(1) / groups;
  geom.h = xc.size(2);
  geom.w = xc.size(3);
  geom.kh = one ? 1 : weight_size[2];
  geom.kw = one ? weight_size[2] : weight_size[3];
  geom.sh = one ? 1 : stride[0];
  geom.sw = one ? stride[0] : stride[1];
  geom.ph = one ? 0 : padding[0];
  geom.pw = one ? padding[0] : padding[1];
  geom.dh = one ? 1 : dilation[0];
  geom.dw = one ? dilation[0] : dilation[1];
  geom.ho = gc.size(2);
  geom.wo = gc.size(3);
  const int64_t ho = (geom.h + 2 * geom.ph - geom.dh * (geom.kh - 1) - 1) / geom.sh + 1;
  const int64_t wo = (geom.w + 2 * geom.pw - geom.dw * (geom.kw - 1) - 1) / geom.sw + 1;
  TORCH_CHECK(geom.ho == ho && geom.wo == wo, op, ": g's spatial size ", gc.sizes(),
              " does not match the convolution of x ", xc.sizes());
  const int64_t t = geom.ho * geom.wo, d_g = geom.c * geom.kh * geom.kw, c_out_g = gc.size(1) / groups;
  const bool gram = math::gram_is_cheaper(t, d_g, c_out_g);
  // Per chunk of samples: unfold [len, G, d_g, T], then per (sample, group) the direct product
  // G_g [c_out_g, T] x cols^T or the two Gram matrices; all groups of a sample sum into its entry.
  const int64_t elem = acc == at::kDouble ? 8 : 4;
  const int64_t product_bytes = elem * groups * (gram ? 2 * t * t : c_out_g * d_g);
  const int64_t cols_bytes = elem * groups * d_g * t;
  const int64_t chunk = samples_per_chunk(b, product_bytes + cols_bytes);
  at::Tensor cols = at::empty({chunk * groups, d_g, t}, out_opts);
  at::Tensor out = at::empty({b}, out_opts);
  const at::Tensor gv = gc.view({b * groups, c_out_g, t});
  auto stream = at::cuda::getCurrentCUDAStream();
  for (int64_t first = 0; first < b; first += chunk) {
    const int64_t len = std::min(chunk, b - first);
    const int64_t total = len * groups * d_g * t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "per_sample_conv_unfold", [&] {
      using x_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(acc, "per_sample_conv_unfold_acc", [&] {
        unfold_kernel<x_t, scalar_t><<<grid_for(total), kThreads, 0, stream>>>(
            xc.const_data_ptr<x_t>(), geom, groups, xc.size(1), first, total, cols.mutable_data_ptr<scalar_t>());
      });
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // a = cols^T [len * G, T, d_g] (a strided view; cuBLAS takes the transpose as it is)
    const at::Tensor a = cols.narrow(0, 0, len * groups).transpose(1, 2);
    const at::Tensor gi = gv.narrow(0, first * groups, len * groups).transpose(1, 2);  // [len * G, T, c_out_g]
    products_and_sums(a, gi, gram, groups, out.narrow(0, first, len), stream);
  }
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("per_sample_grad_sq_norm_direct", &per_sample_grad_sq_norm_direct);
  m.impl("per_sample_grad_sq_norm_gram", &per_sample_grad_sq_norm_gram);
  m.impl("per_sample_conv_grad_sq_norm", &per_sample_conv_grad_sq_norm);
}

}  // namespace cuda
}  // namespace sbfast
