// What the CPU kernels ask of the x86-64 processor they run on, decided at run time: the build
// targets baseline x86-64, and a loop that needs a hardware fused multiply-add (or wants AVX2
// lanes) is compiled a second time with SBFAST_TARGET_V3 and called where cpu_has_fma() says
// the processor has them. Elsewhere __builtin_fma is libm's correctly rounded fma: slow, exact.
#pragma once

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define SBFAST_X86_DISPATCH 1
#define SBFAST_TARGET_V3 __attribute__((target("avx2,fma")))
#define SBFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define SBFAST_X86_DISPATCH 0
#define SBFAST_TARGET_V3
#define SBFAST_ALWAYS_INLINE inline
#endif

namespace sbfast {
namespace cpu {

// AVX2 and FMA (x86-64-v3), asked once.
inline bool cpu_has_fma() {
#if SBFAST_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace sbfast
