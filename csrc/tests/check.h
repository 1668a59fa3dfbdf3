// A minimal check macro for the C++ unit tests: no test framework to install.
#pragma once

#include <cmath>
#include <cstdio>
#include <cstdlib>

namespace sbfast_test {
inline int& failures() {
  static int count = 0;
  return count;
}
inline int& checks() {
  static int count = 0;
  return count;
}
inline int report(const char* name) {
  std::printf("%s: %d checks, %d failed\n", name, checks(), failures());
  return failures() == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
}  // namespace sbfast_test

#define SBFAST_CHECK(cond)                                                    \
  do {                                                                        \
    ++sbfast_test::checks();                                                  \
    if (!(cond)) {                                                            \
      ++sbfast_test::failures();                                              \
      std::fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                         \
  } while (0)

#define SBFAST_CHECK_CLOSE(a, b, rtol)                                                          \
  do {                                                                                          \
    const double sbfast_a = static_cast<double>(a), sbfast_b = static_cast<double>(b);          \
    ++sbfast_test::checks();                                                                    \
    if (!(std::fabs(sbfast_a - sbfast_b) <= (rtol) * std::fmax(1.0, std::fabs(sbfast_b)))) {  \
      ++sbfast_test::failures();                                                                \
      std::fprintf(stderr, "%s:%d: %s = %.17g vs %s = %.17g\n", __FILE__, __LINE__, #a, sbfast_a, #b, sbfast_b); \
    }                                                                                           \
  } while (0)
