// CPU kernels of sbfast::ksmallest_mask and sbfast::sharpbalance_masks (SharpBalance's subset selection).
//
// ksmallest_mask: per row an O(N) radix select on order-preserving keys (sbfast_math.h),
// 11 bits a pass from the top (math::radix_first_shift and friends: the GPU's schedule too).
// The keys are computed once into a buffer (a vectorised loop)
// and histogrammed; each later pass first compacts the keys that share the prefix found so far
// (branch-free) and histograms only those, so the work shrinks geometrically. It stops as soon
// as the whole bucket holding the k-th smallest is taken (the output is then key-prefix <=
// prefix, vectorised), else after the last bit, when the bucket is one exact key value whose
// first `take` occurrences in index order are in: a stable sort's first k, without sorting.
// Rows run in parallel (at::parallel_for) once a task has enough work to pay for a thread.
//
// sharpbalance_masks: one parallel pass counts, per chunk of samples, the members holding each
// sample and the chunk's members of R; a serial scan over the chunk counts gives each chunk
// its first rank in R; a second parallel pass writes every member's flag.
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

constexpr int kHistCopies = 4;  // interleaved histograms: repeated bins do not chain on one counter
constexpr int64_t kAlgebraChunk = 1 << 14;
// Work (scores or mask bytes) a parallel task should hold at least: waking a worker costs tens
// of microseconds, more on a busy machine, and a 3 x 50k selection is done in a few hundred.
constexpr int64_t kMinTaskWork = 1 << 18;

int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// Per-row scratch, reused across the rows one thread handles.
template <typename key_t>
struct RowScratch {
  std::vector<key_t> keys, candidates;
  std::vector<int64_t> hist;
};

// Histogram of digit (key >> shift) & (bins - 1) over keys[0..n), into hist[0..bins).
template <typename key_t>
void digit_histogram(const key_t* keys, int64_t n, int shift, int bins, std::vector<int64_t>& hist) {
  hist.assign(static_cast<size_t>(bins) * kHistCopies, 0);
  const key_t digit_mask = static_cast<key_t>(bins - 1);
  int64_t i = 0;
  for (; i + kHistCopies <= n; i += kHistCopies) {
    for (int c = 0; c < kHistCopies; ++c) ++hist[c * bins + ((keys[i + c] >> shift) & digit_mask)];
  }
  for (; i < n; ++i) ++hist[(keys[i] >> shift) & digit_mask];
  for (int c = 1; c < kHistCopies; ++c) {
    for (int d = 0; d < bins; ++d) hist[d] += hist[c * bins + d];
  }
}

template <typename scalar_t>
void ksmallest_row(const scalar_t* x, int64_t n, int64_t k, bool* out,
                   RowScratch<typename math::score_key<scalar_t>::type>& scratch) {
  using key_t = typename math::score_key<scalar_t>::type;
  constexpr int kKeyBits = 8 * sizeof(key_t);
  scratch.keys.resize(n);
  if (static_cast<int64_t>(scratch.candidates.size()) < n + 1) scratch.candidates.resize(n + 1);
  key_t* keys = scratch.keys.data();
  for (int64_t i = 0; i < n; ++i) keys[i] = math::score_key<scalar_t>::of(x[i]);  // vectorised

  int shift = math::radix_first_shift(kKeyBits);
  int bins = math::radix_bins(kKeyBits, shift);
  digit_histogram(keys, n, shift, bins, scratch.hist);
  key_t prefix = 0, prefix_mask = 0;
  int64_t take = k;  // rank (1-based) of the k-th smallest among the keys with the prefix
  const key_t* pool = keys;  // keys that share the prefix so far (all of them at first)
  int64_t pool_size = n;
  int64_t bucket = 0;  // how many keys share the prefix
  while (true) {
    int64_t below = 0;
    const int d = math::radix_pick_bucket<int64_t>(scratch.hist.data(), bins, take, &below);
    take -= below;
    bucket = scratch.hist[d];
    prefix |= static_cast<key_t>(d) << shift;
    prefix_mask |= static_cast<key_t>(bins - 1) << shift;
    if (take == bucket || shift == 0) break;
    // Keep the chosen bucket's keys (in place once pool is the candidates buffer; the write is
    // unconditional, so the buffer has one spare slot).
    key_t* kept = scratch.candidates.data();
    int64_t num_kept = 0;
    for (int64_t i = 0; i < pool_size; ++i) {
      kept[num_kept] = pool[i];
      num_kept += (pool[i] & prefix_mask) == prefix;
    }
    pool = kept;
    pool_size = num_kept;
    const int next_shift = math::radix_next_shift(shift);
    bins = math::radix_bins(shift, next_shift);
    shift = next_shift;
    digit_histogram(pool, pool_size, shift, bins, scratch.hist);
  }
  if (take == bucket) {
    // The whole bucket is in: no tie to resolve, so no order dependence (vectorised).
    for (int64_t i = 0; i < n; ++i) out[i] = (keys[i] & prefix_mask) <= prefix;
    return;
  }
  int64_t eq_seen = 0;  // keys equal to the k-th smallest: the first `take` in index order are in
  for (int64_t i = 0; i < n; ++i) {
    out[i] = math::ksmallest_take<key_t>(keys[i], prefix_mask, prefix, eq_seen, take);
    eq_seen += (keys[i] & prefix_mask) == prefix;
  }
}

}  // namespace

at::Tensor ksmallest_mask(const at::Tensor& scores, int64_t k) {
  checks::ksmallest_inputs(scores, k, c10::DeviceType::CPU, "sbfast::ksmallest_mask");
  const int64_t m = scores.size(0), n = scores.size(1);
  const auto opts = scores.options().dtype(at::kBool);
  if (k == 0) return at::zeros({m, n}, opts);
  if (k == n) return at::ones({m, n}, opts);
  const at::Tensor c = scores.contiguous();
  at::Tensor out = at::empty({m, n}, opts);
  bool* out_data = out.mutable_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "ksmallest_mask_cpu", [&] {
    const scalar_t* x = c.const_data_ptr<scalar_t>();
    at::parallel_for(0, m, grain_for(n), [&](int64_t first, int64_t last) {
      RowScratch<typename math::score_key<scalar_t>::type> scratch;
      for (int64_t row = first; row < last; ++row) {
        ksmallest_row<scalar_t>(x + row * n, n, k, out_data + row * n, scratch);
      }
    });
  });
  return out;
}

namespace {

// The mask algebra with per-sample counts and owners in cnt_t (uint8 when M < 256: the loops
// then run 16 samples a vector instruction); the variant is a template argument, so the write
// loop holds no loaded flag and vectorises.
template <typename cnt_t, bool kBoost>
void sharpbalance_masks_impl(const bool* flat, int64_t m, int64_t n, bool* dst) {
  const int64_t num_chunks = (n + kAlgebraChunk - 1) / kAlgebraChunk;
  std::vector<cnt_t> counts(n);  // members holding each sample
  std::vector<int64_t> rest_before(num_chunks + 1, 0);  // members of R before each chunk
  // A mask byte costs a fraction of a score's radix passes: four times the work per task.
  const int64_t grain = grain_for(kAlgebraChunk * m / 4);
  at::parallel_for(0, num_chunks, grain, [&](int64_t first, int64_t last) {
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t begin = chunk * kAlgebraChunk, len = std::min(n, begin + kAlgebraChunk) - begin;
      cnt_t* cnt = counts.data() + begin;
      std::fill(cnt, cnt + len, cnt_t{0});
      for (int64_t j = 0; j < m; ++j) {  // row by row: contiguous, vectorised
        const bool* f = flat + j * n + begin;
        for (int64_t i = 0; i < len; ++i) cnt[i] += static_cast<cnt_t>(f[i]);
      }
      int64_t rest = 0;
      for (int64_t i = 0; i < len; ++i) rest += cnt[i] == 0;
      rest_before[chunk + 1] = rest;
    }
  });
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) rest_before[chunk + 1] += rest_before[chunk];
  at::parallel_for(0, num_chunks, grain, [&](int64_t first, int64_t last) {
    std::vector<cnt_t> owner(kAlgebraChunk);
    for (int64_t chunk = first; chunk < last; ++chunk) {
      const int64_t begin = chunk * kAlgebraChunk, len = std::min(n, begin + kAlgebraChunk) - begin;
      const cnt_t* cnt = counts.data() + begin;
      // Rank in R mod M, stepped instead of divided: the one serial loop.
      cnt_t next_owner = static_cast<cnt_t>(rest_before[chunk] % m);
      const cnt_t last_owner = static_cast<cnt_t>(m - 1);
      for (int64_t i = 0; i < len; ++i) {
        owner[i] = next_owner;
        const cnt_t stepped = next_owner == last_owner ? cnt_t{0} : static_cast<cnt_t>(next_owner + 1);
        next_owner = cnt[i] == 0 ? stepped : next_owner;
      }
      // Bytes rather than bool: gcc vectorises uint8 loads and stores, not bool ones.
      const cnt_t* __restrict__ own = owner.data();
      for (int64_t j = 0; j < m; ++j) {
        const uint8_t* __restrict__ f = reinterpret_cast<const uint8_t*>(flat + j * n + begin);
        uint8_t* __restrict__ o = reinterpret_cast<uint8_t*>(dst + j * n + begin);
        const cnt_t member = static_cast<cnt_t>(j);
        for (int64_t i = 0; i < len; ++i) {
          o[i] = math::sharpbalance_flag<cnt_t>(cnt[i], f[i] != 0, own[i], member, kBoost);
        }
      }
    }
  });
}

}  // namespace

at::Tensor sharpbalance_masks(const at::Tensor& flat_mask, int64_t variant) {
  checks::sharpbalance_inputs(flat_mask, variant, c10::DeviceType::CPU, "sbfast::sharpbalance_masks");
  const int64_t m = flat_mask.size(0), n = flat_mask.size(1);
  at::Tensor out = at::empty({m, n}, flat_mask.options());
  if (m == 0 || n == 0) return out;
  const at::Tensor c = flat_mask.contiguous();
  const bool* flat = c.const_data_ptr<bool>();
  bool* dst = out.mutable_data_ptr<bool>();
  TORCH_CHECK(m <= INT32_MAX, "sbfast::sharpbalance_masks: M = ", m, " members is too many");
  if (m < 256) {
    variant == 1 ? sharpbalance_masks_impl<uint8_t, true>(flat, m, n, dst)
                 : sharpbalance_masks_impl<uint8_t, false>(flat, m, n, dst);
  } else {
    variant == 1 ? sharpbalance_masks_impl<int32_t, true>(flat, m, n, dst)
                 : sharpbalance_masks_impl<int32_t, false>(flat, m, n, dst);
  }
  return out;
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("ksmallest_mask", &ksmallest_mask);
  m.impl("sharpbalance_masks", &sharpbalance_masks);
}

}  // namespace cpu
}  // namespace sbfast
