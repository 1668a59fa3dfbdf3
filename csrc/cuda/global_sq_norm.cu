// CUDA kernel of sbfast::global_sq_norm: sum over a list of tensors of sum_i t_i^2.
//
// One multi-tensor launch per dtype in the list (per 96 tensors of it), not one per tensor:
// ResNet18's 62 parameters take one launch and one final sum instead of 62 + 1. As apex's
// multi_tensor_apply does, the tensors' pointers and sizes travel in the kernel's argument
// struct (a table passed by value, so a captured CUDA graph replays it without any host
// buffer), and every block takes one fixed-size chunk of one tensor: block -> (tensor, chunk)
// by a binary search over the table's chunk starts (math::owner_of_item).
//
// Deterministic and graph-capturable: each chunk's sum (a fixed-order tree over the block,
// block_reduce.cuh) lands in its own slot of a float64 partials buffer, and one block sums the
// partials in a fixed order. No atomics, no host synchronisation; launch parameters depend on
// the tensors' sizes only. The result is bit-reproducible run to run; against the CPU kernel it
// differs by the summation order only (tolerance: the tests' 2x-plain-PyTorch rule).
//
// Strided tensors are summed from a contiguous copy (the CPU kernel does the same).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "../sbfast_math.h"
#include "block_reduce.cuh"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;  // loads per thread per chunk, issued before they are summed
constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * kItems;  // elements a block sums
// Tensors per launch: keeps the argument struct under the 4 KiB every architecture accepts.
constexpr int kMaxTensors = 96;
constexpr int kFinalThreads = 1024;

template <typename scalar_t>
struct TensorTable {
  const scalar_t* data[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t chunk_start[kMaxTensors + 1];  // tensor t owns chunks [chunk_start[t], chunk_start[t + 1])
  int count;
};
static_assert(sizeof(TensorTable<double>) <= 4000, "kernel arguments must stay under 4 KiB");

// One block per chunk of one tensor: partials[blockIdx.x] = sum of squares over that chunk.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_sq_sum_kernel(TensorTable<scalar_t> table, double* __restrict__ partials) {
  __shared__ acc_t scratch[kThreads];
  const int64_t chunk = blockIdx.x;
  const int t = math::owner_of_item(table.chunk_start, table.count, chunk);
  const scalar_t* __restrict__ data = table.data[t];
  const int64_t n = table.numel[t];
  const int64_t begin = (chunk - table.chunk_start[t]) * kChunk;
  scalar_t values[kItems];
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t i = begin + static_cast<int64_t>(j) * kThreads + threadIdx.x;
    values[j] = i < n ? data[i] : scalar_t(0);
  }
  acc_t acc = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) acc = math::square_accumulate<acc_t>(acc, static_cast<acc_t>(values[j]));
  const acc_t total = block_sum<kThreads>(acc, scratch);
  if (threadIdx.x == 0) partials[chunk] = static_cast<double>(total);
}

// out[0] = sum of partials[0..count), in float64, in a fixed order.
template <typename out_t>
__global__ void __launch_bounds__(kFinalThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t count, out_t* __restrict__ out) {
  __shared__ double scratch[kFinalThreads];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kFinalThreads) acc += partials[i];
  const double total = block_sum<kFinalThreads>(acc, scratch);
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(total);
}

int64_t chunks_of(int64_t n) {
  return (n + kChunk - 1) / kChunk;
}

// Launches the tensors of one dtype, kMaxTensors at a time; their chunks' partials start at
// partials + first_chunk.
template <typename scalar_t, typename acc_t>
void launch_dtype_group(const std::vector<const at::Tensor*>& tensors, double* partials, int64_t first_chunk,
                        cudaStream_t stream) {
  int64_t offset = first_chunk;
  for (size_t begin = 0; begin < tensors.size(); begin += kMaxTensors) {
    TensorTable<scalar_t> table{};
    const size_t end = std::min(tensors.size(), begin + kMaxTensors);
    table.count = static_cast<int>(end - begin);
    table.chunk_start[0] = 0;
    for (size_t i = begin; i < end; ++i) {
      const int slot = static_cast<int>(i - begin);
      table.data[slot] = tensors[i]->const_data_ptr<scalar_t>();
      table.numel[slot] = tensors[i]->numel();
      table.chunk_start[slot + 1] = table.chunk_start[slot] + chunks_of(tensors[i]->numel());
    }
    const int64_t blocks = table.chunk_start[table.count];
    TORCH_CHECK(blocks <= INT32_MAX, "sbfast::global_sq_norm: ", blocks, " chunks in one launch exceed the grid");
    multi_tensor_sq_sum_kernel<scalar_t, acc_t>
        <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(table, partials + offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    offset += blocks;
  }
}

}  // namespace

at::Tensor global_sq_norm(at::TensorList tensors) {
  constexpr const char* op = "sbfast::global_sq_norm";
  checks::global_sq_norm_inputs(tensors, c10::DeviceType::CUDA, op);
  const auto device = tensors[0].device();
  const at::cuda::CUDAGuard guard(device);
  bool any_double = false;
  for (const auto& t : tensors) any_double = any_double || t.scalar_type() == at::kDouble;
  const auto out_dtype = any_double ? at::kDouble : at::kFloat;

  // Dense copies of strided tensors live until the launches are queued (the caching allocator
  // keeps their memory for this stream's work).
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (const auto& t : tensors) {
    if (t.numel() > 0) dense.push_back(t.contiguous());
  }
  // Groups by dtype, in order of first appearance; tensors keep their list order inside.
  std::vector<at::ScalarType> dtypes;
  std::vector<std::vector<const at::Tensor*>> groups;
  int64_t total_chunks = 0;
  for (const auto& t : dense) {
    size_t g = 0;
    while (g < dtypes.size() && dtypes[g] != t.scalar_type()) ++g;
    if (g == dtypes.size()) {
      dtypes.push_back(t.scalar_type());
      groups.emplace_back();
    }
    groups[g].push_back(&t);
    total_chunks += chunks_of(t.numel());
  }

  const auto opts = at::TensorOptions().device(device);
  at::Tensor partials = at::empty({std::max<int64_t>(total_chunks, 1)}, opts.dtype(at::kDouble));
  at::Tensor out = at::empty({}, opts.dtype(out_dtype));
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t first_chunk = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtypes[g], "global_sq_norm_cuda", [&] {
      if (any_double) {
        launch_dtype_group<scalar_t, double>(groups[g], partials.mutable_data_ptr<double>(), first_chunk, stream);
      } else {
        launch_dtype_group<scalar_t, float>(groups[g], partials.mutable_data_ptr<double>(), first_chunk, stream);
      }
    });
    for (const at::Tensor* t : groups[g]) first_chunk += chunks_of(t->numel());
  }
  AT_DISPATCH_FLOATING_TYPES(out_dtype, "global_sq_norm_cuda_sum", [&] {
    sum_partials_kernel<scalar_t><<<1, kFinalThreads, 0, stream>>>(partials.const_data_ptr<double>(), total_chunks,
                                                                    out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("global_sq_norm", &global_sq_norm);
}

}  // namespace cuda
}  // namespace sbfast
