// Arithmetic shared by the CPU and CUDA kernels.
//
// CUDA cannot run on the team's machines, so every kernel keeps its per-element math here:
// the CPU tests then exercise the very arithmetic the GPU runs, and only the launch and the
// memory layout are GPU-only.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SBFAST_HD __host__ __device__ __forceinline__
#else
#define SBFAST_HD inline
#endif

namespace sbfast {
namespace math {

// ---- rounding: one or two roundings, as written, on host and device ---------------------
//
// nvcc contracts a * b + c into one fma by default (--fmad=true) and gcc does too where the
// target has FMA, so the same source line could round once on the GPU and twice on the CPU.
// Every product-then-sum here says which it means: mul_rn/add_rn round each step (the _rn
// intrinsics are never contracted), fma_rn rounds once on both sides.
//
// The SAM kernels round exactly as torch's CPU kernels do for the reference's ops, so that
// float64 parity with sbfast.reference.SAM + torch.optim.SGD is bit for bit (torch.equal):
// - where torch rounds twice (a tensor product, then an add) nothing may be contracted: these
//   _rn helpers use the _rn intrinsics on the device (nvcc contracts a * b + c by default) and
//   the CPU kernel file turns contraction off (#pragma GCC optimize("fp-contract=off"));
// - where torch rounds once, fma_rn does too: x.add(y, alpha=a) is vec::fmadd(y, a, x) in
//   torch's vectorised CPU loop, and its scalar tail contracts to an fma as well (measured on
//   the AVX2/AVX512 builds of torch 2.14: every element of add(alpha=) equals fma(y, a, x)).
// Host builtins rather than std::fma keep this header free of <cmath>.
SBFAST_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SBFAST_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
SBFAST_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
SBFAST_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
// a * b + c with one rounding.
SBFAST_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}
SBFAST_HD double fma_rn(double a, double b, double c) {
#if defined(__CUDA_ARCH__)
  return __fma_rn(a, b, c);
#else
  return __builtin_fma(a, b, c);
#endif
}

// Accumulation type of a reduction over `scalar_t`: float64 stays float64, everything else
// (float32, bfloat16, float16) accumulates in float32.
template <typename scalar_t>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};

// acc + x^2, the step of every squared-norm reduction: the square rounded, then the sum (never
// an fma), so that a CPU and a GPU lane that see the same values in the same order agree bit
// for bit; the order of a reduction is each kernel's own (and documented there).
template <typename acc_t>
SBFAST_HD acc_t square_accumulate(acc_t acc, acc_t x) {
  return add_rn(acc, mul_rn(x, x));
}

// ---- top-k subset selection (csrc/cpu/select.cpp, csrc/cuda/select.cu) --------------------

// Order-preserving unsigned key of a float: a < b as reals iff order_key(a) < order_key(b).
// -0.0 and +0.0 share a key and every NaN gets the largest key, which is how torch.sort ranks
// them, so a radix select on keys (ties by index) reproduces a stable ascending sort exactly.
// A negative float flips every bit (larger magnitude = smaller); a non-negative one sets the
// sign bit (above every negative). Union punning: gcc and nvcc both define it.
SBFAST_HD uint32_t order_key(float x) {
  union {
    float f;
    uint32_t u;
  } pun;
  pun.f = (x == 0.0f) ? 0.0f : x;
  // Selects, not branches, so a loop of keys vectorises.
  const uint32_t flip = static_cast<uint32_t>(static_cast<int32_t>(pun.u) >> 31) | 0x80000000u;
  return (x != x) ? 0xFFFFFFFFu : (pun.u ^ flip);
}
SBFAST_HD uint64_t order_key(double x) {
  union {
    double f;
    uint64_t u;
  } pun;
  pun.f = (x == 0.0) ? 0.0 : x;
  const uint64_t flip = static_cast<uint64_t>(static_cast<int64_t>(pun.u) >> 63) | 0x8000000000000000ull;
  return (x != x) ? 0xFFFFFFFFFFFFFFFFull : (pun.u ^ flip);
}

// The key type of a score dtype: float64 keeps 64 bits; float32, float16 and bfloat16 widen to
// float exactly (order and equality kept) and use 32.
template <typename scalar_t>
struct score_key {
  using type = uint32_t;
  static SBFAST_HD type of(scalar_t x) { return order_key(static_cast<float>(x)); }
};
template <>
struct score_key<double> {
  using type = uint64_t;
  static SBFAST_HD type of(double x) { return order_key(x); }
};

// The radix select's digit schedule, the same on CPU and GPU: kRadixDigitBits a pass from the
// top bit down, the last pass taking what is left (32-bit keys: 11 + 11 + 10 bits in 3 passes;
// 64-bit keys: 5 x 11 + 9 in 6). 2^11 bins fit a GPU block's shared memory and an L1 cache.
constexpr int kRadixDigitBits = 11;
constexpr int kRadixMaxBins = 1 << kRadixDigitBits;
// Shift of the first pass over keys of key_bits bits.
SBFAST_HD int radix_first_shift(int key_bits) {
  return key_bits - kRadixDigitBits;
}
// Shift of the pass after the one at `shift` (> 0).
SBFAST_HD int radix_next_shift(int shift) {
  return shift > kRadixDigitBits ? shift - kRadixDigitBits : 0;
}
// Bins of the pass at `shift`, the pass before it having been at `prev_shift` (key_bits for the
// first pass).
SBFAST_HD int radix_bins(int prev_shift, int shift) {
  return 1 << (prev_shift - shift);
}
// Passes over keys of key_bits bits.
SBFAST_HD int radix_passes(int key_bits) {
  return (key_bits + kRadixDigitBits - 1) / kRadixDigitBits;
}

// One radix-select step: among the keys counted in hist[0..bins), the bucket d that holds the
// take-th smallest (1 <= take <= total); *below = the number of keys in buckets < d.
template <typename count_t>
SBFAST_HD int radix_pick_bucket(const count_t* hist, int bins, count_t take, count_t* below) {
  count_t acc = 0;
  for (int d = 0; d < bins - 1; ++d) {
    if (acc + hist[d] >= take) {
      *below = acc;
      return d;
    }
    acc += hist[d];
  }
  *below = acc;
  return bins - 1;
}

// Whether a key is among the k smallest once the radix select has settled: its top bits
// (prefix_mask) are below `prefix`, or equal to it and it is one of the first `take` such keys
// in index order (eq_rank = how many keys with that prefix come before it).
template <typename key_t>
SBFAST_HD bool ksmallest_take(key_t key, key_t prefix_mask, key_t prefix, int64_t eq_rank, int64_t take) {
  const key_t top = key & prefix_mask;
  return top < prefix || (top == prefix && eq_rank < take);
}

// SharpBalance SAM flag of `member` for one sample (the subset selection's mask algebra). flat_count members
// hold the sample in their flat set F_j (own_flat: this member does). flat_count == 0 puts it in
// R, where r_owner = (its rank in R, ascending index) mod M names the member whose R_i holds it:
// balance takes R_i, boost takes R minus R_i. Elsewhere the flag is A_i: held by another member,
// i.e. flat_count - own_flat > 0. int_t: any integer type that holds M (uint8 vectorises best).
template <typename int_t>
SBFAST_HD bool sharpbalance_flag(int_t flat_count, bool own_flat, int_t r_owner, int_t member, bool boost) {
  // Both sides evaluated and combined with & and |: no branch or select, so gcc vectorises a
  // loop over samples.
  const bool in_rest = flat_count == 0;
  const bool rest_flag = (r_owner == member) != boost;
  const bool others_flag = flat_count > static_cast<int_t>(own_flat);
  return (in_rest & rest_flag) | (!in_rest & others_flag);
}

// ---- multi-tensor launches (csrc/cuda/global_sq_norm.cu) ---------------------------------

// The tensor that owns work item `item` of a multi-tensor launch: tensor t owns the items
// [starts[t], starts[t + 1]), starts ascending with starts[0] = 0 and item < starts[count].
// Binary search: the largest t < count with starts[t] <= item (empty tensors own no item and
// are skipped over).
SBFAST_HD int owner_of_item(const int64_t* starts, int count, int64_t item) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (starts[mid] <= item) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// ---- fused SAM optimizer (csrc/cpu/sam.cpp, csrc/cuda/sam.cu) ---------------------------

// SAM's perturbed weight w + e, e = (adaptive ? w^2 * g : g) * s, in the reference's order
// (e_w = (pow(p, 2) * grad) * scale; p.add_(e_w)): every product rounded, then the add.
// s = rho / (||g|| + 1e-12) (ASAM: rho / (|| |w| g || + 1e-12)), one scalar per param group.
template <typename T>
SBFAST_HD T sam_perturbed_weight(T w, T g, T s, bool adaptive) {
  const T direction = adaptive ? mul_rn(mul_rn(w, w), g) : g;
  return add_rn(w, mul_rn(direction, s));
}

// torch.optim.SGD (single-tensor path) one element at a time, each line one torch op:
//   d = g + wd * w                       grad.add(param, alpha=wd)          (if wd != 0)
//   buf = m * buf + (1 - dampening) * d  buf.mul_(m).add_(d, alpha=1 - dampening)
//   d = d + m * buf  (nesterov)  or buf  grad.add(buf, alpha=m)
//   w = w - lr * d                       param.add_(d, alpha=-lr)
// On a buffer's first step torch clones d instead of the momentum line (the caller selects).
template <typename T>
SBFAST_HD T sgd_weight_decay(T g, T w, T weight_decay) {
  return fma_rn(w, weight_decay, g);
}
template <typename T>
SBFAST_HD T sgd_momentum(T buf, T d, T momentum, T one_minus_dampening) {
  return fma_rn(d, one_minus_dampening, mul_rn(buf, momentum));
}
template <typename T>
SBFAST_HD T sgd_nesterov(T d, T buf, T momentum) {
  return fma_rn(buf, momentum, d);
}
template <typename T>
SBFAST_HD T sgd_apply(T w, T d, T neg_lr) {
  return fma_rn(d, neg_lr, w);
}

// ---- per-sample gradient norms (csrc/cpu/per_sample_norm.cpp, csrc/cuda/per_sample_norm.cu) 

// Whether the Gram form (two T x T Gram matrices: T^2 (d + p) multiply-adds per sample) costs
// no more than the direct product (T d p) for T positions, input width d, output width p: the
// rule of sbfast.sharpness.choose_form, so Python and the kernels pick the same form.
SBFAST_HD bool gram_is_cheaper(int64_t t, int64_t d, int64_t p) {
  return t * (d + p) <= d * p;
}

// Input coordinate that output position `o` reads through kernel tap `k` along one spatial
// axis of a convolution (may fall into the zero padding: < 0 or >= the input's size).
SBFAST_HD int64_t conv_input_coord(int64_t o, int64_t k, int64_t stride, int64_t padding, int64_t dilation) {
  return o * stride - padding + k * dilation;
}

// The geometry of one sample-group's unfold: input [c, h, w] (unpadded), kernel kh x kw, output
// ho x wo. Its unfold is cols [c * kh * kw, ho * wo] (rows (ci, i, j), columns (oh, ow)).
struct UnfoldGeometry {
  int64_t c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
};

// Offset into the group's input [c, h, w] of unfold element (row, col), or -1 where it reads
// the zero padding. cols[row][col] = x[ci][oh * sh - ph + i * dh][ow * sw - pw + j * dw].
SBFAST_HD int64_t unfold_source_offset(const UnfoldGeometry& g, int64_t row, int64_t col) {
  const int64_t taps = g.kh * g.kw;
  const int64_t ci = row / taps, tap = row - ci * taps;
  const int64_t i = tap / g.kw, j = tap - i * g.kw;
  const int64_t oh = col / g.wo, ow = col - oh * g.wo;
  const int64_t ih = conv_input_coord(oh, i, g.sh, g.ph, g.dh);
  const int64_t iw = conv_input_coord(ow, j, g.sw, g.pw, g.dw);
  const bool inside = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
  return inside ? (ci * g.h + ih) * g.w + iw : -1;
}

// acc + x * y, the step of the Gram form sum_{t,s} (A A^T)_{ts} (G G^T)_{ts}; rounded as
// square_accumulate.
template <typename acc_t>
SBFAST_HD acc_t product_accumulate(acc_t acc, acc_t x, acc_t y) {
  return add_rn(acc, mul_rn(x, y));
}

// ---- ellipsoid projection norms (csrc/cpu/ellipsoid_sq_norms.cpp, csrc/cuda/ellipsoid_sq_norms.cu) --
//
// out[k] = sum_j a_j / (1 + lambda_k b_j)^2 with a_j = (z_j s_j)^2 and b_j = 2 s_j^2 (s = 1/c):
// the squared weighted norm of the candidate z / (1 + 2 lambda / c^2). a and b are formed once
// per element and reused for every lambda. Each step rounds once, as the reference's tensor ops
// do (IEEE division on both sides: the CUDA build does not use fast math).
template <typename acc_t>
SBFAST_HD acc_t ellipsoid_a(acc_t z, acc_t s) {
  const acc_t t = mul_rn(z, s);
  return mul_rn(t, t);
}
template <typename acc_t>
SBFAST_HD acc_t ellipsoid_b(acc_t s) {
  return mul_rn(acc_t(2), mul_rn(s, s));
}
template <typename acc_t>
SBFAST_HD acc_t ellipsoid_term(acc_t a, acc_t b, acc_t lambda) {
  const acc_t d = add_rn(acc_t(1), mul_rn(lambda, b));
  return a / mul_rn(d, d);
}

// ---- the APGD step after an ellipsoid projection (csrc/cpu/ellipsoid_momentum_step.cpp, .cu) --
//
// u = z / (1 + lambda t) with t = 2 / c^2 (lambda = 0: u = z, not divided, so an infinite t
// of a tiny c cannot turn it into NaN), then v = lerp(prev, u, m) rounded as torch's lerp
// rounds it: one fma from the nearer end, fma(m, u - prev, prev) for m < 0.5, else
// fma(m - 1, u - prev, u). The product and the sum of the denominator round once each, as
// torch.mul(t, lambda).add_(1) does.
template <typename acc_t>
SBFAST_HD acc_t ellipsoid_projected(acc_t z, acc_t t, acc_t lambda) {
  return lambda == acc_t(0) ? z : z / add_rn(mul_rn(t, lambda), acc_t(1));
}
template <typename acc_t>
SBFAST_HD acc_t momentum_lerp(acc_t prev, acc_t u, acc_t m) {
  const acc_t diff = u - prev;
  return m < acc_t(0.5) ? fma_rn(m, diff, prev) : fma_rn(m - acc_t(1), diff, u);
}

}  // namespace math
}  // namespace sbfast
