// CPU kernels of the fused SAM optimizer: sbfast::sam_perturb_ and
// sbfast::sam_restore_sgd_, one pass over a contiguous run of a flat parameter buffer each.
//
// Memory-bound: perturb reads w, g and writes w, backup (4 arrays); restore+SGD reads backup,
// g', g_n, buf and writes w, buf (6 arrays, 5 without a normal gradient). Elements are
// independent, so chunks run in parallel and each chunk's loop is a plain vectorisable loop over
// the shared per-element math of sbfast_math.h. Chunks are handed out dynamically (OpenMP
// schedule(dynamic)) rather than split evenly up front as at::parallel_for does: on a machine
// whose cores are shared with other work, an even split waits for the slowest thread (measured
// here: 2 threads slower than 1 for an 11M-element step), dynamic chunks let the free thread
// take more. In runs of 16 MiB and more, the arrays a pass only writes (perturb's backup,
// restore's w) are written with non-temporal stores, which spare the read-for-ownership.
//
// Rounding: float64/float32 results equal torch's own CPU kernels bit for bit (see
// sbfast_math.h): contraction is turned off for this file, and the loops that need a fused
// multiply-add get one compiled for x86-64-v3 (AVX2 + FMA), chosen at run time; elsewhere
// __builtin_fma is libm's correctly rounded fma (slow, but exact).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels.h"

// After the ATen headers, so that only this file's code (and the header math it inlines) is
// compiled without contraction; torch's own inline code keeps its flags.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "../checks.h"
#include "../sbfast_math.h"

#include "x86_features.h"

namespace sbfast {
namespace cpu {
namespace {

// Elements per parallel chunk: ~256 KiB per float32 array, enough to amortise the hand-out.
constexpr int64_t kGrain = 1 << 16;

// f(begin, end) over [0, n) in chunks of kGrain, handed out dynamically to torch's intra-op
// threads; serial inside another parallel region or for a single chunk.
template <typename F>
void parallel_chunks(int64_t n, const F& f) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
#ifdef _OPENMP
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads > 1 && !at::in_parallel_region()) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(static_cast<int>(threads))
    for (int64_t c = 0; c < chunks; ++c) {
      f(c * kGrain, std::min(n, (c + 1) * kGrain));
    }
    return;
  }
#endif
  for (int64_t c = 0; c < chunks; ++c) {
    f(c * kGrain, std::min(n, (c + 1) * kGrain));
  }
}

// float for float32/bfloat16/float16 storage (torch's opmath type), double for float64.
template <typename scalar_t>
using compute_t = typename math::acc_type<scalar_t>::type;

// Non-temporal stores for the arrays a pass only writes (perturb's backup, restore's w): they
// skip the read-for-ownership a normal store costs, one parameter-sized read less per pass
// (measured: ~10% off perturb on an 11M-element run). Only for runs larger than half a typical
// L3: below that, normal stores leave w in cache for the next forward pass. Blocks of
// kStreamBlock elements are computed with the plain loops (into L1), then streamed.
constexpr int64_t kStreamBlock = 256;
constexpr int64_t kStreamMinBytes = int64_t{1} << 24;

template <typename scalar_t>
constexpr bool kStreamable = SBFAST_X86_DISPATCH && (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>);

#if SBFAST_X86_DISPATCH
template <typename scalar_t>
SBFAST_TARGET_V3 SBFAST_ALWAYS_INLINE void stream_block(scalar_t* dst, const scalar_t* src) {
  // dst 32-byte aligned, kStreamBlock elements
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t j = 0; j < kStreamBlock; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
  } else {
    for (int64_t j = 0; j < kStreamBlock; j += 4) _mm256_stream_pd(dst + j, _mm256_loadu_pd(src + j));
  }
}
#endif

// Elements before dst + i is 32-byte aligned (at most 7), so that the blocks can stream.
template <typename scalar_t>
int64_t unaligned_head(const scalar_t* dst, int64_t n) {
  const auto misalign = reinterpret_cast<uintptr_t>(dst) & 31;
  if (misalign % sizeof(scalar_t) != 0) return n;  // never aligned: no streaming
  return std::min<int64_t>(n, misalign == 0 ? 0 : (32 - misalign) / sizeof(scalar_t));
}

// ---------------------------------------------------------------------------------------
// sam_perturb_: backup = w; w = w + e
// ---------------------------------------------------------------------------------------

template <typename scalar_t, bool WriteBackup = true>
SBFAST_ALWAYS_INLINE void perturb_body(scalar_t* __restrict w, scalar_t* __restrict backup,
                                       const scalar_t* __restrict g, compute_t<scalar_t> s,
                                       bool adaptive, int64_t n) {
  using T = compute_t<scalar_t>;
  if (adaptive) {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t wi = w[i];
      if constexpr (WriteBackup) backup[i] = wi;
      w[i] = static_cast<scalar_t>(math::sam_perturbed_weight<T>(static_cast<T>(wi), static_cast<T>(g[i]), s, true));
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const scalar_t wi = w[i];
      if constexpr (WriteBackup) backup[i] = wi;
      w[i] = static_cast<scalar_t>(math::sam_perturbed_weight<T>(static_cast<T>(wi), static_cast<T>(g[i]), s, false));
    }
  }
}

// No fma in the perturbation (contraction is off), but the AVX2 build is still the faster
// loop (wider vectors, fewer instructions per byte moved, streaming stores); same bits.
template <typename scalar_t>
SBFAST_TARGET_V3 void perturb_loop_avx2(scalar_t* w, scalar_t* backup, const scalar_t* g,
                                        compute_t<scalar_t> s, bool adaptive, int64_t n, bool stream) {
#if SBFAST_X86_DISPATCH
  if constexpr (kStreamable<scalar_t>) {
    if (!stream) return perturb_body<scalar_t>(w, backup, g, s, adaptive, n);
    int64_t i = unaligned_head(backup, n);
    perturb_body<scalar_t>(w, backup, g, s, adaptive, i);
    for (; i + kStreamBlock <= n; i += kStreamBlock) {
      stream_block<scalar_t>(backup + i, w + i);  // the raw w, then w + e from L1
      perturb_body<scalar_t, false>(w + i, nullptr, g + i, s, adaptive, kStreamBlock);
    }
    perturb_body<scalar_t>(w + i, backup + i, g + i, s, adaptive, n - i);
    _mm_sfence();
    return;
  }
#endif
  perturb_body<scalar_t>(w, backup, g, s, adaptive, n);
}

template <typename scalar_t>
void perturb_loop(scalar_t* w, scalar_t* backup, const scalar_t* g, compute_t<scalar_t> s,
                  bool adaptive, int64_t n, bool stream) {
  if (cpu_has_fma()) return perturb_loop_avx2<scalar_t>(w, backup, g, s, adaptive, n, stream);
  perturb_body<scalar_t>(w, backup, g, s, adaptive, n);
}

// ---------------------------------------------------------------------------------------
// sam_restore_sgd_: w = backup (or w); g = (g' [+ g_n]) * inv_scale; SGD step
// ---------------------------------------------------------------------------------------

template <typename T>
struct SgdCoeffs {
  T inv_scale;
  T weight_decay;
  T momentum;
  T one_minus_dampening;
  T neg_lr;
  bool has_weight_decay;
  bool nesterov;
  bool first;  // the momentum buffers' first step: buf = d
};

template <typename scalar_t>
struct RestoreArgs {
  scalar_t* w;
  const scalar_t* src;  // backup, or w itself (no restore); may alias w
  scalar_t* grad;          // g'; receives g' + g_n when WriteSum
  const scalar_t* normal;  // g_n, or nullptr
  scalar_t* buf;     // momentum buffer, or nullptr
  bool stream;       // non-temporal stores for w (a run larger than kStreamMinBytes)
};

// Elements [begin, end); the new w goes to out[i - begin] (a.w + begin, or an L1 block that
// is then streamed to w).
template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
SBFAST_ALWAYS_INLINE void restore_sgd_body(const RestoreArgs<scalar_t>& a,
                                           const SgdCoeffs<compute_t<scalar_t>>& c, int64_t begin,
                                           int64_t end, scalar_t* out) {
  using T = compute_t<scalar_t>;
  const scalar_t* src = a.src;
  scalar_t* __restrict grad = a.grad;
  const scalar_t* __restrict normal = a.normal;
  scalar_t* __restrict buf = a.buf;
  for (int64_t i = begin; i < end; ++i) {
    const T w0 = static_cast<T>(src[i]);
    T g = static_cast<T>(grad[i]);
    if constexpr (HasNormal) {
      g = math::add_rn(g, static_cast<T>(normal[i]));
      if constexpr (WriteSum) grad[i] = static_cast<scalar_t>(g);
    }
    g = math::mul_rn(g, c.inv_scale);  // exact when inv_scale == 1
    T d = c.has_weight_decay ? math::sgd_weight_decay(g, w0, c.weight_decay) : g;
    if constexpr (HasMomentum) {
      const T b = c.first ? d : math::sgd_momentum(static_cast<T>(buf[i]), d, c.momentum, c.one_minus_dampening);
      buf[i] = static_cast<scalar_t>(b);
      d = c.nesterov ? math::sgd_nesterov(d, b, c.momentum) : b;
    }
    out[i - begin] = static_cast<scalar_t>(math::sgd_apply(w0, d, c.neg_lr));
  }
}

template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
SBFAST_TARGET_V3 void restore_sgd_loop_fma(const RestoreArgs<scalar_t>& a,
                                           const SgdCoeffs<compute_t<scalar_t>>& c, int64_t begin,
                                           int64_t end) {
#if SBFAST_X86_DISPATCH
  // with a backup, w is only written: stream it
  if constexpr (kStreamable<scalar_t>) {
    if (a.stream && a.src != a.w) {
      alignas(32) scalar_t block[kStreamBlock];
      int64_t i = begin + unaligned_head(a.w + begin, end - begin);
      restore_sgd_body<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, begin, i, a.w + begin);
      for (; i + kStreamBlock <= end; i += kStreamBlock) {
        restore_sgd_body<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, i, i + kStreamBlock, block);
        stream_block<scalar_t>(a.w + i, block);
      }
      restore_sgd_body<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, i, end, a.w + i);
      _mm_sfence();
      return;
    }
  }
#endif
  restore_sgd_body<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, begin, end, a.w + begin);
}

template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
void restore_sgd_loop_generic(const RestoreArgs<scalar_t>& a,
                              const SgdCoeffs<compute_t<scalar_t>>& c, int64_t begin, int64_t end) {
  restore_sgd_body<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, begin, end, a.w + begin);
}

template <typename scalar_t, bool HasNormal, bool WriteSum, bool HasMomentum>
void restore_sgd_run(const RestoreArgs<scalar_t>& a, const SgdCoeffs<compute_t<scalar_t>>& c,
                     int64_t n) {
  const bool fma = cpu_has_fma();
  parallel_chunks(n, [&](int64_t begin, int64_t end) {
    if (fma) {
      restore_sgd_loop_fma<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, begin, end);
    } else {
      restore_sgd_loop_generic<scalar_t, HasNormal, WriteSum, HasMomentum>(a, c, begin, end);
    }
  });
}

template <typename scalar_t>
void restore_sgd_dispatch(const RestoreArgs<scalar_t>& a, const SgdCoeffs<compute_t<scalar_t>>& c,
                          int64_t n, bool write_sum) {
  const bool has_normal = a.normal != nullptr;
  const bool has_momentum = a.buf != nullptr;
  if (has_momentum) {
    if (!has_normal) return restore_sgd_run<scalar_t, false, false, true>(a, c, n);
    if (write_sum) return restore_sgd_run<scalar_t, true, true, true>(a, c, n);
    return restore_sgd_run<scalar_t, true, false, true>(a, c, n);
  }
  if (!has_normal) return restore_sgd_run<scalar_t, false, false, false>(a, c, n);
  if (write_sum) return restore_sgd_run<scalar_t, true, true, false>(a, c, n);
  return restore_sgd_run<scalar_t, true, false, false>(a, c, n);
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------


void check_scalar(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " is on ", t.device(), ", expected cpu");
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ",
              t.scalar_type());
}

double read_scalar(const at::Tensor& t) {
  // A CPU tensor: reading it is a load, not a device synchronisation.
  double value = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "sam_read_scalar", [&] {
    value = static_cast<double>(*t.const_data_ptr<scalar_t>());
  });
  return value;
}

}  // namespace

void sam_perturb_(const at::Tensor& param, const at::Tensor& backup, const at::Tensor& grad,
                  const at::Tensor& scale, bool adaptive) {
  constexpr const char* op = "sbfast::sam_perturb_";
  checks::sam_param(param, c10::DeviceType::CPU, op);
  checks::like_param(backup, param, op, "backup");
  checks::like_param(grad, param, op, "grad");
  check_scalar(scale, op, "scale");
  const int64_t n = param.numel();
  if (n == 0) return;
  const double s = read_scalar(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_perturb_cpu", [&] {
    using T = compute_t<scalar_t>;
    scalar_t* w = param.mutable_data_ptr<scalar_t>();
    scalar_t* bk = backup.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    if (s == 0.0) {
      // rho == 0 or a skipped step (non-finite norm): w stays as it is, bit for bit (w + g * 0
      // could turn an infinite g into NaN), and the backup is still written for the restore.
      parallel_chunks(n, [&](int64_t begin, int64_t end) {
        std::copy(w + begin, w + end, bk + begin);
      });
      return;
    }
    const T st = static_cast<T>(s);
    const bool stream = n * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytes;
    parallel_chunks(n, [&](int64_t begin, int64_t end) {
      perturb_loop<scalar_t>(w + begin, bk + begin, g + begin, st, adaptive, end - begin, stream);
    });
  });
}

void sam_restore_sgd_(const at::Tensor& param, const std::optional<at::Tensor>& backup,
                      const at::Tensor& grad, const std::optional<at::Tensor>& normal_grad,
                      const std::optional<at::Tensor>& momentum_buf,
                      const std::optional<at::Tensor>& momentum_ready, const at::Tensor& lr,
                      const at::Tensor& skip, const at::Tensor& inv_scale, double weight_decay,
                      double momentum, double dampening, bool nesterov, bool write_grad_sum) {
  constexpr const char* op = "sbfast::sam_restore_sgd_";
  checks::sam_param(param, c10::DeviceType::CPU, op);
  const bool has_momentum = checks::restore_sgd_arrays(
      param, backup, grad, normal_grad, momentum_buf, momentum_ready, momentum, write_grad_sum, op);
  check_scalar(lr, op, "lr");
  check_scalar(skip, op, "skip");
  check_scalar(inv_scale, op, "inv_scale");
  const int64_t n = param.numel();
  const bool skipped = read_scalar(skip) != 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sam_restore_sgd_cpu", [&] {
    using T = compute_t<scalar_t>;
    scalar_t* w = param.mutable_data_ptr<scalar_t>();
    if (skipped) {
      // A skipped step still leaves w unperturbed; nothing else changes.
      if (backup && n > 0) {
        const scalar_t* bk = backup->const_data_ptr<scalar_t>();
        parallel_chunks(n, [&](int64_t begin, int64_t end) {
          std::copy(bk + begin, bk + end, w + begin);
        });
      }
      return;
    }
    RestoreArgs<scalar_t> a{
        w,
        backup ? backup->const_data_ptr<scalar_t>() : w,
        grad.mutable_data_ptr<scalar_t>(),
        normal_grad ? normal_grad->const_data_ptr<scalar_t>() : nullptr,
        has_momentum ? momentum_buf->mutable_data_ptr<scalar_t>() : nullptr,
        n * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamMinBytes,
    };
    SgdCoeffs<T> c{
        static_cast<T>(read_scalar(inv_scale)),
        static_cast<T>(weight_decay),
        static_cast<T>(momentum),
        static_cast<T>(1.0 - dampening),
        static_cast<T>(-read_scalar(lr)),
        weight_decay != 0.0,
        nesterov,
        has_momentum && momentum_ready->const_data_ptr<uint8_t>()[0] == 0,
    };
    if (n > 0) restore_sgd_dispatch<scalar_t>(a, c, n, write_grad_sum);
  });
  if (has_momentum && !skipped) momentum_ready->fill_(1);
}

TORCH_LIBRARY_IMPL(sbfast, CPU, m) {
  m.impl("sam_perturb_", &sam_perturb_);
  m.impl("sam_restore_sgd_", &sam_restore_sgd_);
}

}  // namespace cpu
}  // namespace sbfast
