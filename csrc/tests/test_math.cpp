// C++ tests of the arithmetic in sbfast_math.h that the CUDA kernels share with the CPU: the
// GPU runs these very functions, so a CPU check here is a check of the GPU's arithmetic.
#include <ATen/ATen.h>

#include <cstring>
#include <vector>

#include "check.h"
#include "sbfast_math.h"

namespace math = sbfast::math;

namespace {

// Values where one rounding and two differ: x = 1 + 2^-12, x*x = 1 + 2^-11 + 2^-24 rounds to
// 1 + 2^-11 in float, so -1 + x*x is 2^-11 with two roundings and 2^-11 + 2^-24 with an fma.
void rounding_is_as_written() {
  const float x = 1.0f + 0x1p-12f;
  SBFAST_CHECK(math::square_accumulate<float>(-1.0f, x) == 0x1p-11f);
  SBFAST_CHECK(math::product_accumulate<float>(-1.0f, x, x) == 0x1p-11f);
  SBFAST_CHECK(math::fma_rn(x, x, -1.0f) == 0x1p-11f + 0x1p-24f);
  const double y = 1.0 + 0x1p-27;  // the same in float64: 2^-54 lost by the rounded square
  SBFAST_CHECK(math::square_accumulate<double>(-1.0, y) == 0x1p-26);
  SBFAST_CHECK(math::fma_rn(y, y, -1.0) == 0x1p-26 + 0x1p-54);
  SBFAST_CHECK(math::add_rn(math::mul_rn(y, y), -1.0) == 0x1p-26);
}

// The radix schedule covers every key bit once, in passes of at most 2^11 bins and at least
// 512 (the CUDA pick kernel splits a pass's bins over 256 threads).
void radix_schedule_covers_the_key() {
  for (int key_bits : {32, 64}) {
    int prev = key_bits, passes = 0, covered = 0;
    for (int shift = math::radix_first_shift(key_bits);; shift = math::radix_next_shift(shift)) {
      const int bins = math::radix_bins(prev, shift);
      SBFAST_CHECK(bins >= 512 && bins <= math::kRadixMaxBins);
      covered += prev - shift;
      prev = shift;
      ++passes;
      if (shift == 0) break;
    }
    SBFAST_CHECK(covered == key_bits);
    SBFAST_CHECK(passes == math::radix_passes(key_bits));
  }
  SBFAST_CHECK(math::radix_passes(32) == 3 && math::radix_passes(64) == 6);
}

// A two-level pick (coarse sums, then inside the coarse bucket), as the CUDA pick kernel does
// it, finds the same bucket and count below as one pick over all bins.
void two_level_pick_matches_one() {
  const int bins = 2048, coarse_bins = 256, per = bins / coarse_bins;
  for (int seed = 0; seed < 20; ++seed) {
    std::vector<unsigned long long> hist(bins, 0);
    unsigned long long total = 0;
    for (int d = 0; d < bins; ++d) {
      // sparse and clustered histograms: most bins empty, a few heavy
      const unsigned long long v = ((d * 7919 + seed * 104729) % 13 == 0) ? (d % 5) * (seed + 1) : 0;
      hist[d] = v;
      total += v;
    }
    if (total == 0) continue;
    std::vector<unsigned long long> coarse(coarse_bins, 0);
    for (int d = 0; d < bins; ++d) coarse[d / per] += hist[d];
    for (unsigned long long take : {1ull, total / 3 + 1, total / 2 + 1, total}) {
      unsigned long long below = 0, below_c = 0, below_f = 0;
      const int d = math::radix_pick_bucket<unsigned long long>(hist.data(), bins, take, &below);
      const int c = math::radix_pick_bucket<unsigned long long>(coarse.data(), coarse_bins, take, &below_c);
      const int f = math::radix_pick_bucket<unsigned long long>(hist.data() + c * per, per, take - below_c, &below_f);
      SBFAST_CHECK(c * per + f == d);
      SBFAST_CHECK(below_c + below_f == below);
      SBFAST_CHECK(below < take && take <= below + hist[d]);
    }
  }
}

// owner_of_item: item -> tensor of a multi-tensor launch, empty tensors skipped.
void owner_of_item_finds_the_tensor() {
  const std::vector<int64_t> sizes = {3, 0, 1, 0, 0, 5, 2};  // chunks per tensor
  std::vector<int64_t> starts = {0};
  for (int64_t s : sizes) starts.push_back(starts.back() + s);
  const int count = static_cast<int>(sizes.size());
  for (int t = 0; t < count; ++t) {
    for (int64_t item = starts[t]; item < starts[t + 1]; ++item) {
      SBFAST_CHECK(math::owner_of_item(starts.data(), count, item) == t);
    }
  }
  const int64_t one[] = {0, 4};
  SBFAST_CHECK(math::owner_of_item(one, 1, 3) == 0);
}

// The CUDA kernel's unfold, element by element through unfold_source_offset, equals at::im2col
// (strides, padding, dilation, non-square kernels, groups).
void unfold_matches_im2col() {
  struct Case {
    int64_t c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, groups;
  };
  for (const Case& k : {Case{3, 7, 7, 3, 3, 1, 1, 1, 1, 1, 1, 1}, Case{6, 9, 7, 2, 3, 2, 1, 0, 2, 1, 2, 3},
                        Case{4, 5, 5, 3, 3, 1, 1, 1, 1, 1, 1, 4}, Case{2, 1, 13, 1, 5, 1, 3, 0, 2, 1, 1, 1},
                        Case{1, 4, 4, 4, 4, 4, 4, 0, 0, 1, 1, 1}}) {
    const at::Tensor x = at::randn({1, k.c, k.h, k.w}, at::kDouble);
    const at::Tensor cols = at::im2col(x, {k.kh, k.kw}, {k.dh, k.dw}, {k.ph, k.pw}, {k.sh, k.sw})[0];  // [c*kh*kw, T]
    math::UnfoldGeometry g{};
    g.c = k.c / k.groups;
    g.h = k.h;
    g.w = k.w;
    g.kh = k.kh;
    g.kw = k.kw;
    g.sh = k.sh;
    g.sw = k.sw;
    g.ph = k.ph;
    g.pw = k.pw;
    g.dh = k.dh;
    g.dw = k.dw;
    g.ho = (k.h + 2 * k.ph - k.dh * (k.kh - 1) - 1) / k.sh + 1;
    g.wo = (k.w + 2 * k.pw - k.dw * (k.kw - 1) - 1) / k.sw + 1;
    const int64_t t = g.ho * g.wo, d_g = g.c * k.kh * k.kw;
    SBFAST_CHECK(cols.size(1) == t && cols.size(0) == k.groups * d_g);
    const at::Tensor xc = x.contiguous();
    const double* xd = xc.const_data_ptr<double>();
    bool same = true;
    for (int64_t grp = 0; grp < k.groups; ++grp) {
      const double* xg = xd + grp * g.c * k.h * k.w;
      for (int64_t row = 0; row < d_g; ++row) {
        for (int64_t col = 0; col < t; ++col) {
          const int64_t off = math::unfold_source_offset(g, row, col);
          const double value = off >= 0 ? xg[off] : 0.0;
          same = same && value == cols[grp * d_g + row][col].item<double>();
        }
      }
    }
    SBFAST_CHECK(same);
  }
}

void gram_rule_matches_choose_form() {
  // sbfast.sharpness.choose_form: gram when T (d + p) <= d p
  SBFAST_CHECK(math::gram_is_cheaper(16, 4608, 512));    // ResNet18 stage 4: T small
  SBFAST_CHECK(!math::gram_is_cheaper(256, 1152, 128));  // stage 2: direct
  SBFAST_CHECK(math::gram_is_cheaper(1, 1, 1) == false && math::gram_is_cheaper(1, 2, 2));
}

}  // namespace

int main() {
  rounding_is_as_written();
  radix_schedule_covers_the_key();
  two_level_pick_matches_one();
  owner_of_item_finds_the_tensor();
  unfold_matches_im2col();
  gram_rule_matches_choose_form();
  return sbfast_test::report("test_math");
}
