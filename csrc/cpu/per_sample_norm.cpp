// CPU kernels of sbfast::per_sample_grad_sq_norm_direct / _gram and
// sbfast::per_sample_conv_grad_sq_norm: per-sample squared norms of a layer's weight gradient.
//
// All three parallelise over SAMPLES (at::parallel_for), and each sample's work runs
// single-threaded inside the parallel region: a per-sample problem is too small to split over
// threads efficiently (a batch-1 convolution or a 64 x 64 GEMM pays a barrier per call, which
// on a busy 2-core machine costs more than the arithmetic), while B samples split evenly with one
// barrier per layer. Inside, only kernels that are safe to run concurrently (at::mm, im2col; not
// oneDNN convolutions, which share scratch memory between threads). Each sample's gradient (or
// Gram matrices) lives only in a per-sample buffer that is reduced to one number at once;
// nothing [B, p, d]-sized is ever allocated.
//
// * direct: s_i = ||G_i^T A_i||_F^2 with one GEMM per sample (a [B, T, d], g [B, T, p]).
// * gram:   s_i = sum_{t,s} (A_i A_i^T)_{ts} (G_i G_i^T)_{ts}, two GEMMs per sample.
// * conv:   s_i = ||dW_i||^2 with dW_i the convolution's weight gradient for sample i alone: that
//           sample's unfold (cache-sized, never the whole batch's) times its output gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../sbfast_math.h"
#include "kernels.h"

namespace sbfast {
namespace cpu {
namespace {

at::ScalarType acc_scalar_type(const at::Tensor& a, const at::Tensor& g) {
  return (a.scalar_type() == at::kDouble || g.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
}

// sum of squares of a contiguous float/double buffer (acc lanes, as global_sq_norm).
template <typename acc_t>
acc_t buffer_sq_sum(const acc_t* data, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = math::square_accumulate<acc_t>(lanes[l], data[i + l]);
  }
  acc_t total = 0;
  for (; i < n; ++i) total = math::square_accumulate<acc_t>(total, data[i]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// sum_k x_k y_k of one run of at most kDotRun elements, in kLanes lanes.
template <typename acc_t>
acc_t run_dot(const acc_t* x, const acc_t* y, int64_t n) {
  constexpr int kLanes = 16;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = math::product_accumulate<acc_t>(lanes[l], x[i + l], y[i + l]);
  }
  acc_t total = 0;
  for (; i < n; ++i) total = math::product_accumulate<acc_t>(total, x[i], y[i]);
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// sum_k x_k y_k of two contiguous buffers of the same length. A Gram pair of T x T holds T^2
// products whose sum cancels (each O(1), the total O(T)): past kDotRun elements (T > 256) the
// runs' sums are added in float64, so the lanes' float32 error does not grow with T^2 (it was
// 70x the Gram identity's own in plain torch at T = 4097). Up to kDotRun, one run, as before.
constexpr int64_t kDotRun = int64_t{1} << 16;
template <typename acc_t>
acc_t buffer_dot(const acc_t* x, const acc_t* y, int64_t n) {
  if (n <= kDotRun) return run_dot<acc_t>(x, y, n);
  double total = 0;
  for (int64_t begin = 0; begin < n; begin += kDotRun) {
    total += static_cast<double>(run_dot<acc_t>(x + begin, y + begin, std::min(kDotRun, n - begin)));
  }
  return static_cast<acc_t>(total);
}

// Unfold of one sample: cols[(c*kh + i)*kw + j][h*wo + w] = xp[c][h*sh + i*dh][w*sw + j*dw] with xp
// the zero-padded input [c, hp, wp]. Rows are copied whole where the stride is 1 (memcpy), which
// is what makes this several times faster than at::im2col's element-wise loop.
template <typename T>
void unfold_sample(const T* xp, int64_t c, int64_t hp, int64_t wp, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                   int64_t dh, int64_t dw, int64_t ho, int64_t wo, T* cols) {
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t i = 0; i < kh; ++i) {
      for (int64_t j = 0; j < kw; ++j) {
        T* out = cols + ((ci * kh + i) * kw + j) * ho * wo;
        for (int64_t h = 0; h < ho; ++h) {
          // xp is padded already: the shared coordinate math with zero padding
          const T* src = xp + (ci * hp + math::conv_input_coord(h, i, sh, 0, dh)) * wp +
                         math::conv_input_coord(0, j, sw, 0, dw);
          T* dst = out + h * wo;
          if (sw == 1) {
            std::memcpy(dst, src, sizeof(T) * wo);
          } else {
            for (int64_t w = 0; w < wo; ++w) dst[w] = src[w * sw];
          }
        }
      }
    }
  }
}

// xp = x [c, h, w] with ph rows and pw columns of zeros on each side.
template <typename T>
void pad_sample(const T* x, int64_t c, int64_t h, int64_t w, int64_t ph, int64_t pw, T* xp) {
  const int64_t hp = h + 2 * ph, wp = w + 2 * pw;
  std::fill(xp, xp + c * hp * wp, T(0));
  for (int64_t ci = 0; ci < c; ++ci) {
    for (int64_t r = 0; r < h; ++r) {
      std::memcpy(xp + (ci * hp + r + ph) * wp + pw, x + (ci * h + r) * w, sizeof(T) * w);
    }
  }
}

// Runs fn(i) -> acc for every sample i, in parallel over samples, into a [B] tensor.
template <typename acc_t, typename Fn>
at::Tensor per_sample(int64_t b, at::ScalarType acc, const Fn& fn) {
  at::Tensor out = at::empty({b}, at::TensorOptions().dtype(acc));
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) o[i] = fn(i);
  });
  return out;
}

}  // namespace

at::Tensor per_sample_grad_sq_norm_direct(const at::Tensor& a_in, const at::Tensor& g_in) {
  checks::per_sample_pair(a_in, g_in, c10::DeviceType::CPU, "sbfast::per_sample_grad_sq_norm_direct");
  const at::ScalarType acc = acc_scalar_type(a_in, g_in);
  const int64_t b = a_in.size(0);
  if (b == 0 || a_in.size(1) == 0 || a_in.size(2) == 0 || g_in.size(2) == 0) {
    return at::zeros({b}, at::TensorOptions().dtype(acc));
  }
  const at::Tensor a = a_in.to(acc), g = g_in.to(acc);  // half/bfloat16 products in float32
  return AT_DISPATCH_FLOATING_TYPES(acc, "per_sample_grad_sq_norm_direct_cpu", [&] {
    return per_sample<scalar_t>(b, acc, [&](int64_t i) {
      const at::Tensor grad = at::mm(g[i].t(), a[i]).contiguous();  // [p, d], this sample only
      return buffer_sq_sum<scalar_t>(grad.const_data_ptr<scalar_t>(), grad.numel());
    });
  });
}

at::Tensor per_sample_grad_sq_norm_gram(const at::Tensor& a_in, const at::Tensor& g_in) {
  checks::per_sample_pair(a_in, g_in, c10::DeviceType::CPU, "sbfast::per_sample_grad_sq_norm_gram");
  const at::ScalarType acc = acc_scalar_type(a_in, g_in);
  const int64_t b = a_in.size(0);
  if (b == 0 || a_in.size(1) == 0 || a_in.size(2) == 0 || g_in.size(2) == 0) {
    return at::zeros({b}, at::TensorOptions().dtype(acc));
  }
  const at::Tensor a = a_in.to(acc), g = g_in.to(acc);
  return AT_DISPATCH_FLOATING_TYPES(acc, "per_sample_grad_sq_norm_gram_cpu", [&] {
    return per_sample<scalar_t>(b, acc, [&](int64_t i) {
      const at::Tensor aa = at::mm(a[i], a[i].t()).contiguous();  // [T, T]
      const at::Tensor gg = at::mm(g[i], g[i].t()).contiguous();
      return buffer_dot<scalar_t>(aa.const_data_ptr<scalar_t>(), gg.const_data_ptr<scalar_t>(), aa.numel());
    });
  });
}

at::Tensor per_sample_conv_grad_sq_norm(const at::Tensor& x, const at::Tensor& g, at::IntArrayRef weight_size,
                                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                        int64_t groups) {
  checks::conv_inputs(x, g, weight_size, stride, padding, dilation, groups, c10::DeviceType::CPU,
                      "sbfast::per_sample_conv_grad_sq_norm");
  const int64_t spatial = x.dim() - 2;
  const at::ScalarType acc = acc_scalar_type(x, g);
  const int64_t b = x.size(0);
  if (b == 0 || x.numel() == 0 || g.numel() == 0) return at::zeros({b}, at::TensorOptions().dtype(acc));
  // Conv1d runs as a 2-D problem with a height-1 kernel. Half/bfloat16 inputs compute in float32.
  const bool one = spatial == 1;
  const at::Tensor xc = (one ? x.unsqueeze(2) : x).to(acc).contiguous();
  const at::Tensor gc = (one ? g.unsqueeze(2) : g).to(acc).contiguous();
  const std::vector<int64_t> kernel = one ? std::vector<int64_t>{1, weight_size[2]}
                                          : std::vector<int64_t>{weight_size[2], weight_size[3]};
  const std::vector<int64_t> st = one ? std::vector<int64_t>{1, stride[0]} : stride.vec();
  const std::vector<int64_t> pad = one ? std::vector<int64_t>{0, padding[0]} : padding.vec();
  const std::vector<int64_t> dil = one ? std::vector<int64_t>{1, dilation[0]} : dilation.vec();
  const int64_t c_in = xc.size(1) / groups, c_out = gc.size(1) / groups;
  const int64_t h = xc.size(2), w = xc.size(3), hp = h + 2 * pad[0], wp = w + 2 * pad[1];
  const int64_t ho = gc.size(2), wo = gc.size(3), t = ho * wo, d = c_in * kernel[0] * kernel[1];
  TORCH_CHECK(ho == (hp - dil[0] * (kernel[0] - 1) - 1) / st[0] + 1 && wo == (wp - dil[1] * (kernel[1] - 1) - 1) / st[1] + 1,
              "sbfast::per_sample_conv_grad_sq_norm: g's spatial size ", gc.sizes(), " does not match the convolution "
              "of x ", xc.sizes());
  const bool padded = pad[0] != 0 || pad[1] != 0;
  at::Tensor out = at::empty({b}, at::TensorOptions().dtype(acc));
  // Per sample and group: unfold that sample alone into a per-thread buffer ([C_in/G * k, T],
  // cache-sized, never the whole batch's) and one GEMM with its output gradient [C_out/G, T].
  // Deliberately not the convolution library's weight-gradient kernel: oneDNN is not safe to
  // run concurrently from several threads (shared scratch memory).
  AT_DISPATCH_FLOATING_TYPES(acc, "per_sample_conv_grad_sq_norm_cpu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, b, 1, [&](int64_t first, int64_t last) {
      const auto opts = at::TensorOptions().dtype(acc);
      at::Tensor xpad = padded ? at::empty({c_in, hp, wp}, opts) : at::Tensor();
      at::Tensor cols = at::empty({d, t}, opts);
      at::Tensor dw = at::empty({c_out, d}, opts);
      for (int64_t i = first; i < last; ++i) {
        scalar_t total = 0;
        for (int64_t grp = 0; grp < groups; ++grp) {
          const scalar_t* xi = xc[i].narrow(0, grp * c_in, c_in).const_data_ptr<scalar_t>();
          if (padded) {
            pad_sample<scalar_t>(xi, c_in, h, w, pad[0], pad[1], xpad.data_ptr<scalar_t>());
            xi = xpad.const_data_ptr<scalar_t>();
          }
          unfold_sample<scalar_t>(xi, c_in, hp, wp, kernel[0], kernel[1], st[0], st[1], dil[0], dil[1], ho, wo,
                                  cols.data_ptr<scalar_t>());
          const at::Tensor gi = gc[i].narrow(0, grp * c_out, c_out).view({c_out, t});
          at::mm_out(dw, gi, cols.t());  // this sample's weight gradient of this group
          total += buffer_sq_sum<scalar_t>(dw.const_data_ptr<scalar_t>(), dw.numel());
        }
        o[i] = total;
      }
    });
  });
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("per_sample_grad_sq_norm_direct", &per_sample_grad_sq_norm_direct);
  m.impl("per_sample_grad_sq_norm_gram", &per_sample_grad_sq_norm_gram);
  m.impl("per_sample_conv_grad_sq_norm", &per_sample_conv_grad_sq_norm);
}

}  // namespace cpu
}  // namespace sbfast
