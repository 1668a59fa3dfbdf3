// CUDA kernels of sbfast::ksmallest_mask and sbfast::sharpbalance_masks (SharpBalance's
// subset selection: each member's k flattest samples, then the mask algebra).
//
// No host synchronisation anywhere (k is a host int the caller already has), so both ops can
// be captured in a CUDA graph. Indices and offsets are 64-bit: a row may pass 2^31 scores.
//
// ksmallest_mask: a radix select on the order-preserving keys of sbfast_math.h, 11 bits a pass
// from the top (math::radix_first_shift and friends, the CPU kernel's schedule: 3 passes for
// 32-bit keys, 6 for float64), with every row spread over many blocks so that a few long rows
// (3 members x 1.28M samples) still fill every SM:
//   init            one thread per row: prefix 0, take k;
//   per pass        histogram: rows x tiles blocks, each histograms its tile's keys that carry
//                   the row's prefix in shared memory and adds its bins to the row's global
//                   histogram (64-bit integer atomics: exact, so the result cannot depend on
//                   the order); pick: one block per row finds the bucket of the take-th
//                   smallest (math::radix_pick_bucket) and clears the histogram;
//   tied counts     rows x tiles blocks: per tile, the keys equal to the settled prefix;
//   at::cumsum      over the tiles of each row;
//   write           rows x tiles blocks: a settled row (the whole bucket in) is elementwise;
//                   else the tied keys are ranked in index order (tile offset from the scan,
//                   block-wide ballot scan inside), the first `take` are in. Ties by index are
//                   exactly the CPU kernel's (a stable sort's first k).
// A row that settles early skips the remaining passes inside the kernels (a flag in its state).
//
// sharpbalance_masks: tile kernel 1 counts, per tile of kThreads samples, the members of R
// (samples no member holds); an inclusive at::cumsum over the tile counts gives each tile its
// first rank in R; tile kernel 2 recounts, ranks its R members with the same ballot scan and
// writes every member's flag (math::sharpbalance_flag). Three launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "../sbfast_math.h"
#include "block_reduce.cuh"

namespace sbfast {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;  // loads in flight per thread in the histogram passes
constexpr int kRadixBins = math::kRadixMaxBins;

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

// The radix select's progress on one row, in device memory: the key prefix found so far (the
// top bits under prefix_mask), the rank (1-based) of the k-th smallest among the keys with that
// prefix, and whether the whole bucket is in (then no later pass has anything to do).
struct RowState {
  unsigned long long prefix;
  unsigned long long prefix_mask;
  long long take;
  long long done;
};
static_assert(sizeof(RowState) == 4 * sizeof(int64_t), "RowState lives in an int64 [rows, 4] tensor");

// Launch geometry of a row chunk: rows x tiles blocks, block b = (row b / tiles, tile b % tiles),
// each tile `tile` consecutive scores of its row (a multiple of kThreads * kItems).
struct Tiling {
  int64_t n;
  int64_t tiles;
  int64_t tile;
};

__global__ void init_state_kernel(RowState* __restrict__ state, int64_t rows, int64_t k) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r < rows) state[r] = RowState{0ull, 0ull, static_cast<long long>(k), 0ll};
}

// One histogram pass: every block counts, in shared memory, the digit (key >> shift) & (bins - 1)
// of the keys of its tile that carry its row's prefix, then adds its non-zero bins to the row's
// global histogram (integer atomics: the counts are exact whatever the order). Lanes of a warp
// that hit the same bin are merged with __match_any_sync first, so clustered scores (all equal,
// say) do not serialise on one shared counter. kItems loads a thread are issued before use.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const scalar_t* __restrict__ scores, Tiling tiling, int shift, int bins,
                           const RowState* __restrict__ state, unsigned long long* __restrict__ hist) {
  using key_of = math::score_key<scalar_t>;
  using key_t = typename key_of::type;
  __shared__ unsigned int counts[kRadixBins];
  const int64_t row = blockIdx.x / tiling.tiles, tile = blockIdx.x - row * tiling.tiles;
  const RowState st = state[row];
  if (st.done) return;  // the whole block sees the same flag
  const key_t prefix = static_cast<key_t>(st.prefix), prefix_mask = static_cast<key_t>(st.prefix_mask);
  const scalar_t* x = scores + row * tiling.n;
  const int64_t begin = tile * tiling.tile, end = std::min(tiling.n, begin + tiling.tile);
  const int lane = threadIdx.x & 31;
  for (int b = threadIdx.x; b < bins; b += kThreads) counts[b] = 0;
  __syncthreads();
  for (int64_t base = begin; base < end; base += static_cast<int64_t>(kThreads) * kItems) {
    key_t keys[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * kThreads + threadIdx.x;
      keys[j] = i < end ? key_of::of(x[i]) : key_t(0);
    }
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const int64_t i = base + j * kThreads + threadIdx.x;
      const bool match = i < end && (keys[j] & prefix_mask) == prefix;
      // bins marks "no bin": such lanes group together and add nothing.
      const unsigned digit = match ? static_cast<unsigned>((keys[j] >> shift) & static_cast<key_t>(bins - 1))
                                   : static_cast<unsigned>(bins);
      const unsigned peers = __match_any_sync(0xffffffffu, digit);
      if (match && lane == __ffs(peers) - 1) atomicAdd(&counts[digit], static_cast<unsigned>(__popc(peers)));
    }
  }
  __syncthreads();
  unsigned long long* row_hist = hist + row * kRadixBins;
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (counts[b] != 0) atomicAdd(&row_hist[b], static_cast<unsigned long long>(counts[b]));
  }
}

// After a histogram pass, one block per row picks the bucket holding the take-th smallest
// (math::radix_pick_bucket twice: over kPickThreads coarse sums of bins / kPickThreads bins
// each, then inside the chosen coarse bucket; the same bucket as one pick over all bins), moves
// the row's state on and clears the row's histogram for the next pass.
constexpr int kPickThreads = 256;
static_assert(kRadixBins / kPickThreads >= 1, "the smallest pass (512 bins) splits over the pick threads");

__global__ void __launch_bounds__(kPickThreads)
    radix_pick_kernel(int shift, int bins, RowState* __restrict__ state, unsigned long long* __restrict__ hist) {
  __shared__ unsigned long long coarse[kPickThreads];
  const int64_t row = blockIdx.x;
  RowState st = state[row];
  if (st.done) return;
  unsigned long long* row_hist = hist + row * kRadixBins;
  const int per = bins / kPickThreads;  // bins >= 512 on every pass (math::radix_* schedule)
  unsigned long long sum = 0;
  for (int j = 0; j < per; ++j) sum += row_hist[threadIdx.x * per + j];
  coarse[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned long long take = static_cast<unsigned long long>(st.take);
    unsigned long long below_coarse = 0, below_fine = 0;
    const int c = math::radix_pick_bucket<unsigned long long>(coarse, kPickThreads, take, &below_coarse);
    const int f = math::radix_pick_bucket<unsigned long long>(row_hist + c * per, per, take - below_coarse,
                                                              &below_fine);
    const int d = c * per + f;
    const unsigned long long rest = take - below_coarse - below_fine;
    st.prefix |= static_cast<unsigned long long>(d) << shift;
    st.prefix_mask |= static_cast<unsigned long long>(bins - 1) << shift;
    st.take = static_cast<long long>(rest);
    st.done = rest == row_hist[d];  // the whole bucket is in
    state[row] = st;
  }
  __syncthreads();  // row_hist read by thread 0 above
  for (int b = threadIdx.x; b < bins; b += kPickThreads) row_hist[b] = 0;
}

// Rows whose k-th smallest key value is tied across the cut: per tile, how many keys equal the
// settled prefix (all bits by now), for the index-order ranking of ksmallest_write_kernel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    tied_count_kernel(const scalar_t* __restrict__ scores, Tiling tiling, const RowState* __restrict__ state,
                      long long* __restrict__ tile_counts) {
  using key_of = math::score_key<scalar_t>;
  using key_t = typename key_of::type;
  __shared__ long long scratch[kThreads];
  const int64_t row = blockIdx.x / tiling.tiles, tile = blockIdx.x - row * tiling.tiles;
  const RowState st = state[row];
  long long count = 0;
  if (!st.done) {
    const key_t prefix = static_cast<key_t>(st.prefix), prefix_mask = static_cast<key_t>(st.prefix_mask);
    const scalar_t* x = scores + row * tiling.n;
    const int64_t begin = tile * tiling.tile, end = std::min(tiling.n, begin + tiling.tile);
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) count += (key_of::of(x[i]) & prefix_mask) == prefix;
  }
  const long long total = block_sum<kThreads>(count, scratch);
  if (threadIdx.x == 0) tile_counts[blockIdx.x] = total;
}

// The output pass. A settled row (the whole bucket in) is elementwise. Otherwise one exact key
// value straddles the k-th place and its first `take` occurrences in index order are in: each
// tile starts from the tied keys of the tiles before it (tile_ends - tile_counts, an inclusive
// scan) and ranks its own with a block-wide ballot scan, kThreads keys at a time.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    ksmallest_write_kernel(const scalar_t* __restrict__ scores, Tiling tiling, const RowState* __restrict__ state,
                           const long long* __restrict__ tile_counts, const long long* __restrict__ tile_ends,
                           bool* __restrict__ out) {
  using key_of = math::score_key<scalar_t>;
  using key_t = typename key_of::type;
  __shared__ int warp_totals[kWarps];
  const int64_t row = blockIdx.x / tiling.tiles, tile = blockIdx.x - row * tiling.tiles;
  const RowState st = state[row];
  const key_t prefix = static_cast<key_t>(st.prefix), prefix_mask = static_cast<key_t>(st.prefix_mask);
  const int64_t take = st.take;
  const scalar_t* x = scores + row * tiling.n;
  bool* o = out + row * tiling.n;
  const int64_t begin = tile * tiling.tile, end = std::min(tiling.n, begin + tiling.tile);
  if (st.done) {
    // Every key whose top bits are <= prefix is in (eq_rank 0 < take: all tied keys taken).
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      o[i] = math::ksmallest_take<key_t>(key_of::of(x[i]), prefix_mask, prefix, 0, take);
    }
    return;
  }
  int64_t seen = tile_ends[blockIdx.x] - tile_counts[blockIdx.x];
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const key_t key = i < end ? key_of::of(x[i]) : key_t(0);
    const bool eq = i < end && (key & prefix_mask) == prefix;
    int sub_total = 0;
    const int rank = block_exclusive_count(eq, warp_totals, &sub_total);
    if (i < end) o[i] = math::ksmallest_take<key_t>(key, prefix_mask, prefix, seen + rank, take);
    seen += sub_total;
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

namespace {

// Rows per launch chunk: the global histograms ([rows, 2^11] counters) stay under 64 MiB.
constexpr int64_t kMaxRowsPerChunk = (int64_t{64} << 20) / (kRadixBins * sizeof(unsigned long long));
// Scores one block reads at most per pass: keeps the shared 32-bit counters exact.
constexpr int64_t kMaxTile = int64_t{1} << 30;

// Spreads a row over enough blocks that rows x tiles fill the GPU about four times over.
Tiling tiling_for(int64_t rows, int64_t n) {
  const int64_t quantum = static_cast<int64_t>(kThreads) * kItems;
  const int64_t target = 4 * static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
  const int64_t max_tiles = (n + quantum - 1) / quantum;
  int64_t tiles = std::clamp<int64_t>((target + rows - 1) / rows, 1, std::max<int64_t>(1, max_tiles));
  tiles = std::max(tiles, (n + kMaxTile - 1) / kMaxTile);
  int64_t tile = (n + tiles - 1) / tiles;
  tile = (tile + quantum - 1) / quantum * quantum;
  return Tiling{n, (n + tile - 1) / tile, tile};
}

template <typename scalar_t>
void ksmallest_rows(const scalar_t* scores, int64_t rows, int64_t n, int64_t k, bool* out,
                    const at::TensorOptions& opts, cudaStream_t stream) {
  using key_t = typename math::score_key<scalar_t>::type;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  const Tiling tiling = tiling_for(rows, n);
  const int64_t blocks = rows * tiling.tiles;
  TORCH_CHECK(blocks <= INT32_MAX, "sbfast::ksmallest_mask: ", blocks, " blocks exceed the grid");
  at::Tensor state = at::empty({rows, 4}, opts.dtype(at::kLong));
  at::Tensor hist = at::zeros({rows, kRadixBins}, opts.dtype(at::kLong));
  auto* st = reinterpret_cast<RowState*>(state.mutable_data_ptr<int64_t>());
  auto* h = reinterpret_cast<unsigned long long*>(hist.mutable_data_ptr<int64_t>());
  init_state_kernel<<<static_cast<unsigned>((rows + 255) / 256), 256, 0, stream>>>(st, rows, k);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Every pass is launched (no host synchronisation to learn that a row settled early); the
  // kernels of a settled row return at once.
  int prev_shift = kKeyBits;
  for (int shift = math::radix_first_shift(kKeyBits);; shift = math::radix_next_shift(shift)) {
    const int bins = math::radix_bins(prev_shift, shift);
    radix_histogram_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(scores, tiling, shift,
                                                                                             bins, st, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    radix_pick_kernel<<<static_cast<unsigned>(rows), kPickThreads, 0, stream>>>(shift, bins, st, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    prev_shift = shift;
    if (shift == 0) break;
  }
  at::Tensor tile_counts = at::empty({rows, tiling.tiles}, opts.dtype(at::kLong));
  tied_count_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      scores, tiling, st, reinterpret_cast<long long*>(tile_counts.mutable_data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor tile_ends = at::cumsum(tile_counts, 1);
  ksmallest_write_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      scores, tiling, st, reinterpret_cast<const long long*>(tile_counts.const_data_ptr<int64_t>()),
      reinterpret_cast<const long long*>(tile_ends.const_data_ptr<int64_t>()), out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor ksmallest_mask(const at::Tensor& scores, int64_t k) {
  checks::ksmallest_inputs(scores, k, c10::DeviceType::CUDA, "sbfast::ksmallest_mask");
  const int64_t m = scores.size(0), n = scores.size(1);
  const at::cuda::CUDAGuard guard(scores.device());
  const auto opts = scores.options().dtype(at::kBool);
  if (k == 0 || m == 0) return at::zeros({m, n}, opts);
  if (k == n) return at::ones({m, n}, opts);
  const at::Tensor c = scores.contiguous();  // strided scores: selected from a dense copy
  at::Tensor out = at::empty({m, n}, opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "ksmallest_mask_cuda", [&] {
    for (int64_t first = 0; first < m; first += kMaxRowsPerChunk) {
      const int64_t rows = std::min(kMaxRowsPerChunk, m - first);
      ksmallest_rows<scalar_t>(c.const_data_ptr<scalar_t>() + first * n, rows, n, k,
                               out.mutable_data_ptr<bool>() + first * n, scores.options(), stream);
    }
  });
  return out;
}

at::Tensor sharpbalance_masks(const at::Tensor& flat_mask, int64_t variant) {
  checks::sharpbalance_inputs(flat_mask, variant, c10::DeviceType::CUDA, "sbfast::sharpbalance_masks");
  const int64_t m = flat_mask.size(0), n = flat_mask.size(1);
  const at::cuda::CUDAGuard guard(flat_mask.device());
  at::Tensor out = at::empty({m, n}, flat_mask.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor flat = flat_mask.contiguous();  // strided masks: read from a dense copy
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
