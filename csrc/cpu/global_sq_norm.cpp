// CPU kernel of sbfast::global_sq_norm: sum over a list of tensors of sum_i t_i^2.
//
// Memory-bound: one read of every element. Each chunk accumulates in acc_type lanes (which
// gcc vectorises) and chunk results are summed in float64, so the rounding error grows with
// the chunk length, not with the total length.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../sbfast_math.h"
#include "kernels.h"

namespace sbfast {
namespace cpu {
namespace {

constexpr int64_t kChunk = 2048;  // 128 additions per float lane: ~1e-7 relative error
constexpr int kLanes = 16;

template <typename scalar_t>
double chunk_sq_sum(const scalar_t* data, int64_t n) {
  using acc_t = typename math::acc_type<scalar_t>::type;
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      lanes[l] = math::square_accumulate<acc_t>(lanes[l], static_cast<acc_t>(data[i + l]));
    }
  }
  acc_t tail = 0;
  for (; i < n; ++i) {
    tail = math::square_accumulate<acc_t>(tail, static_cast<acc_t>(data[i]));
  }
  double total = static_cast<double>(tail);
  for (int l = 0; l < kLanes; ++l) {
    total += static_cast<double>(lanes[l]);
  }
  return total;
}

template <typename scalar_t>
double tensor_sq_sum(const scalar_t* data, int64_t n) {
  // Parallel over whole chunks, so that the float rounding inside a chunk does not depend on
  // how many threads run.
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  return at::parallel_reduce(
      0, num_chunks, 1, 0.0,
      [&](int64_t first, int64_t last, double partial) {
        for (int64_t c = first; c < last; ++c) {
          const int64_t begin = c * kChunk;
          partial += chunk_sq_sum(data + begin, std::min(n, begin + kChunk) - begin);
        }
        return partial;
      },
      std::plus<double>());
}

}  // namespace

at::Tensor global_sq_norm(at::TensorList tensors) {
  checks::global_sq_norm_inputs(tensors, c10::DeviceType::CPU, "sbfast::global_sq_norm");
  bool any_double = false;
  for (const auto& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  double total = 0.0;
  for (const auto& t : tensors) {
    if (t.numel() == 0) continue;
    const at::Tensor c = t.contiguous();  // strided views: summed from a dense copy
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "global_sq_norm_cpu", [&] {
      total += tensor_sq_sum<scalar_t>(c.const_data_ptr<scalar_t>(), c.numel());
    });
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(any_double ? at::kDouble : at::kFloat));
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("global_sq_norm", &global_sq_norm);
}

}  // namespace cpu
}  // namespace sbfast
