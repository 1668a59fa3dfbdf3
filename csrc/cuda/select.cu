// CUDA kernels of sbfast::ksmallest_mask and sbfast::sharpbalance_masks (ALGORITHM.md section 4).
//
// No host synchronisation anywhere (k is a host int the caller already has), so both ops can
// be captured in a CUDA graph.
//
// ksmallest_mask: one block of 1024 threads per row runs a radix select on the order-preserving
// keys of sbfast_math.h, 8 bits a pass from the top (4 passes for 32-bit keys, 8 for float64):
// each pass histograms, in shared memory, the next byte of the keys that share the prefix found
// so far; one thread then picks the bucket holding the k-th smallest (math::radix_pick_bucket).
// Lanes of a warp that hit the same bin are merged with __match_any_sync first, so clustered
// scores (all equal, say) do not serialise on one shared counter. The select stops as soon as
// the whole bucket is taken; the output pass is then elementwise. Otherwise (ties of one exact
// key straddle the k-th place) the output pass walks the row in index order, a tile of 1024 at
// a time, ranking the tied keys with a block-wide ballot scan so that the first `take` are in.
// Each pass reads the row again (from L2 after the first one for rows of a few MB); four loads
// a thread are issued before they are used, to keep enough bytes in flight for one SM.
//
// sharpbalance_masks: tile kernel 1 counts, per tile of 1024 samples, the members of R (samples
// no member holds); an inclusive at::cumsum over the tile counts gives each tile its first rank
// in R; tile kernel 2 recounts, ranks its R members with the same ballot scan and writes every
// member's flag (math::sharpbalance_flag). Three launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../sbfast_math.h"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // loads in flight per thread in the histogram passes
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// Exclusive count of `flag` over the threads of the block before this one (thread order), and
// the block's total in *total. Every thread of the block must call it (it synchronises).
__device__ __forceinline__ int block_exclusive_count(bool flag, int* warp_totals, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  const int in_warp = __popc(ballot & ((1u << lane) - 1u));
  if (lane == 0) warp_totals[warp] = __popc(ballot);
  __syncthreads();
  int before = 0, sum = 0;
  for (int w = 0; w < kWarps; ++w) {
    const int t = warp_totals[w];
    before += w < warp ? t : 0;
    sum += t;
  }
  __syncthreads();  // warp_totals is rewritten by the next call
  *total = sum;
  return before + in_warp;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ksmallest_mask_kernel(const scalar_t* __restrict__ scores, int64_t n, int64_t k, bool* __restrict__ out) {
  using key_of = math::score_key<scalar_t>;
  using key_t = typename key_of::type;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const scalar_t* x = scores + static_cast<int64_t>(blockIdx.x) * n;
  bool* o = out + static_cast<int64_t>(blockIdx.x) * n;
  const int lane = threadIdx.x & 31;

  __shared__ unsigned int hist[kRadixBins];
  __shared__ int warp_totals[kWarps];
  __shared__ key_t s_prefix;
  __shared__ unsigned int s_take;
  __shared__ bool s_done;

  key_t prefix = 0, prefix_mask = 0;
  unsigned int take = static_cast<unsigned int>(k);  // rank (1-based) among keys with the prefix
  bool done = false;
  for (int shift = kKeyBits - kRadixBits; shift >= 0 && !done; shift -= kRadixBits) {
    for (int b = threadIdx.x; b < kRadixBins; b += kThreads) hist[b] = 0;
    __syncthreads();
    for (int64_t base = 0; base < n; base += static_cast<int64_t>(kThreads) * kItems) {
      key_t keys[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = base + j * kThreads + threadIdx.x;
        keys[j] = i < n ? key_of::of(x[i]) : key_t(0);
      }
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        const int64_t i = base + j * kThreads + threadIdx.x;
        const bool match = i < n && (keys[j] & prefix_mask) == prefix;
        // kRadixBins marks "no bin": such lanes group together and add nothing.
        const unsigned digit = match ? static_cast<unsigned>((keys[j] >> shift) & (kRadixBins - 1)) : kRadixBins;
        const unsigned peers = __match_any_sync(0xffffffffu, digit);
        if (match && lane == __ffs(peers) - 1) atomicAdd(&hist[digit], static_cast<unsigned>(__popc(peers)));
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned int below = 0;
      const int d = math::radix_pick_bucket<unsigned int>(hist, kRadixBins, take, &below);
      s_prefix = prefix | (static_cast<key_t>(d) << shift);
      s_take = take - below;
      s_done = s_take == hist[d];  // the whole bucket is in
    }
    __syncthreads();
    prefix = s_prefix;
    prefix_mask |= static_cast<key_t>(kRadixBins - 1) << shift;
    take = s_take;
    done = s_done;
    __syncthreads();  // hist and the s_ values are rewritten by the next pass
  }

  if (done) {
    // Every key whose top bits are <= prefix is in (eq_rank 0 < take: all tied keys taken).
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      o[i] = math::ksmallest_take<key_t>(key_of::of(x[i]), prefix_mask, prefix, 0, take);
    }
    return;
  }
  // One exact key value straddles the k-th place: the first `take` of it in index order are in.
  int64_t seen = 0;
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const key_t key = i < n ? key_of::of(x[i]) : key_t(0);
    const bool eq = i < n && (key & prefix_mask) == prefix;
    int tile_total = 0;
    const int rank = block_exclusive_count(eq, warp_totals, &tile_total);
    if (i < n) o[i] = math::ksmallest_take<key_t>(key, prefix_mask, prefix, seen + rank, take);
    seen += tile_total;
  }
}

// Members holding sample i (i < n) of flat [m, n].
__device__ __forceinline__ int32_t members_holding(const bool* __restrict__ flat, int64_t m, int64_t n, int64_t i) {
  int32_t count = 0;
  for (int64_t j = 0; j < m; ++j) count += flat[j * n + i];
  return count;
}

__global__ void __launch_bounds__(kThreads)
    rest_tile_counts_kernel(const bool* __restrict__ flat, int64_t m, int64_t n, int64_t* __restrict__ tile_counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const bool in_rest = i < n && members_holding(flat, m, n, i) == 0;
  const int count = __syncthreads_count(in_rest);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = count;
}

__global__ void __launch_bounds__(kThreads)
    sharpbalance_write_kernel(const bool* __restrict__ flat, int64_t m, int64_t n, bool boost,
                              const int64_t* __restrict__ tile_counts, const int64_t* __restrict__ tile_ends,
                              bool* __restrict__ out) {
  __shared__ int warp_totals[kWarps];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int32_t count = i < n ? members_holding(flat, m, n, i) : 1;
  int tile_total = 0;
  const int rank_in_tile = block_exclusive_count(count == 0, warp_totals, &tile_total);
  if (i >= n) return;
  // R members before this tile (inclusive scan minus this tile), then this one's place in R.
  const int64_t rank = tile_ends[blockIdx.x] - tile_counts[blockIdx.x] + rank_in_tile;
  const int64_t owner = rank % m;
  for (int64_t j = 0; j < m; ++j) {
    out[j * n + i] = math::sharpbalance_flag<int64_t>(count, flat[j * n + i], owner, j, boost);
  }
}

}  // namespace

at::Tensor ksmallest_mask(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.is_cuda(), "sbfast::ksmallest_mask (CUDA kernel): scores on ", scores.device());
  TORCH_CHECK(scores.dim() == 2, "sbfast::ksmallest_mask: scores must be 2-D [M, N], got ", scores.sizes());
  TORCH_CHECK(at::isFloatingType(scores.scalar_type()),
              "sbfast::ksmallest_mask: expected floating scores, got ", scores.scalar_type());
  const int64_t m = scores.size(0), n = scores.size(1);
  TORCH_CHECK(0 <= k && k <= n, "sbfast::ksmallest_mask: k = ", k, " outside [0, N = ", n, "]");
  TORCH_CHECK(n <= INT32_MAX, "sbfast::ksmallest_mask: N = ", n, " is above 2^31 - 1");
  TORCH_CHECK(m <= INT32_MAX, "sbfast::ksmallest_mask: M = ", m, " is above 2^31 - 1");
  const at::cuda::CUDAGuard guard(scores.device());
  const auto opts = scores.options().dtype(at::kBool);
  if (k == 0 || m == 0) return at::zeros({m, n}, opts);
  if (k == n) return at::ones({m, n}, opts);
  const at::Tensor c = scores.contiguous();
  at::Tensor out = at::empty({m, n}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "ksmallest_mask_cuda", [&] {
    ksmallest_mask_kernel<scalar_t><<<static_cast<unsigned>(m), kThreads, 0, stream>>>(
        c.const_data_ptr<scalar_t>(), n, k, out.mutable_data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor sharpbalance_masks(const at::Tensor& flat_mask, int64_t variant) {
  TORCH_CHECK(flat_mask.is_cuda(), "sbfast::sharpbalance_masks (CUDA kernel): flat_mask on ", flat_mask.device());
  TORCH_CHECK(flat_mask.dim() == 2, "sbfast::sharpbalance_masks: flat_mask must be 2-D [M, N], got ",
              flat_mask.sizes());
  TORCH_CHECK(flat_mask.scalar_type() == at::kBool, "sbfast::sharpbalance_masks: expected a bool flat_mask, got ",
              flat_mask.scalar_type());
  TORCH_CHECK(variant == 0 || variant == 1, "sbfast::sharpbalance_masks: variant = ", variant,
              ", expected 0 (balance) or 1 (boost)");
  const int64_t m = flat_mask.size(0), n = flat_mask.size(1);
  const at::cuda::CUDAGuard guard(flat_mask.device());
  at::Tensor out = at::empty({m, n}, flat_mask.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor flat = flat_mask.contiguous();
  const int64_t tiles = (n + kThreads - 1) / kThreads;
  TORCH_CHECK(tiles <= INT32_MAX, "sbfast::sharpbalance_masks: N = ", n, " is too large");
  at::Tensor tile_counts = at::empty({tiles}, flat.options().dtype(at::kLong));
  auto stream = at::cuda::getCurrentCUDAStream();
  rest_tile_counts_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      flat.const_data_ptr<bool>(), m, n, tile_counts.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor tile_ends = at::cumsum(tile_counts, 0);
  sharpbalance_write_kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
      flat.const_data_ptr<bool>(), m, n, variant == 1, tile_counts.const_data_ptr<int64_t>(),
      tile_ends.const_data_ptr<int64_t>(), out.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CUDA, m) {
  m.impl("ksmallest_mask", &ksmallest_mask);
  m.impl("sharpbalance_masks", &sharpbalance_masks);
}

}  // namespace cuda
}  // namespace sbfast
