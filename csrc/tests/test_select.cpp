// C++ tests of the selection kernels and of their shared arithmetic.
#include <ATen/ATen.h>

#include <limits>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "sbfast_math.h"

namespace {

// The first k of a stable ascending sort of each row: what ksmallest_mask must equal.
at::Tensor stable_first_k(const at::Tensor& scores, int64_t k) {
  const at::Tensor order = std::get<1>(scores.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
  at::Tensor mask = at::zeros(scores.sizes(), at::kBool);
  if (k > 0) mask.scatter_(1, order.narrow(1, 0, k), true);
  return mask;
}

// The subset selection written as loops, for the mask algebra.
at::Tensor masks_by_hand(const at::Tensor& flat, bool boost) {
  const int64_t M = flat.size(0), N = flat.size(1);
  auto f = flat.accessor<bool, 2>();
  at::Tensor out = at::zeros({M, N}, at::kBool);
  auto o = out.accessor<bool, 2>();
  int64_t rest_rank = 0;
  for (int64_t s = 0; s < N; ++s) {
    int64_t count = 0;
    for (int64_t j = 0; j < M; ++j) count += f[j][s];
    const int64_t owner = count == 0 ? rest_rank++ % M : -1;
    for (int64_t i = 0; i < M; ++i) {
      o[i][s] = count == 0 ? ((owner == i) != boost) : (count - f[i][s] > 0);
    }
  }
  return out;
}

}  // namespace

int main() {
  using sbfast::math::order_key;
  // The key orders floats as reals: -inf < -1 < -0 == +0 < tiny < 1 < inf < NaN.
  const std::vector<float> ascending = {-std::numeric_limits<float>::infinity(), -1.0f, -1e-30f, 0.0f,
                                        1e-30f, 1.0f, std::numeric_limits<float>::infinity()};
  for (size_t i = 0; i + 1 < ascending.size(); ++i) SBFAST_CHECK(order_key(ascending[i]) < order_key(ascending[i + 1]));
  SBFAST_CHECK(order_key(-0.0f) == order_key(0.0f));
  SBFAST_CHECK(order_key(std::numeric_limits<float>::quiet_NaN()) > order_key(std::numeric_limits<float>::infinity()));
  SBFAST_CHECK(order_key(-2.0) < order_key(-1.0) && order_key(1.0) < order_key(2.0));

  // Bucket pick: histogram {2, 0, 3, 1}; the 3rd smallest lies in bucket 2 with 2 below it.
  const int64_t hist[4] = {2, 0, 3, 1};
  int64_t below = -1;
  SBFAST_CHECK(sbfast::math::radix_pick_bucket<int64_t>(hist, 4, 3, &below) == 2 && below == 2);
  SBFAST_CHECK(sbfast::math::radix_pick_bucket<int64_t>(hist, 4, 6, &below) == 3 && below == 5);

  for (int64_t n : {1, 7, 129, 4097}) {
    for (int64_t m : {1, 3}) {
      // Few distinct values: ties everywhere, so the index tie-break is exercised.
      const at::Tensor scores = at::randint(0, 5, {m, n}, at::kFloat);
      for (int64_t k : {int64_t(0), int64_t(1), n / 2, n}) {
        SBFAST_CHECK(at::equal(sbfast::cpu::ksmallest_mask(scores, k), stable_first_k(scores, k)));
        SBFAST_CHECK(at::equal(sbfast::cpu::ksmallest_mask(scores.to(at::kDouble), k), stable_first_k(scores, k)));
      }
      const at::Tensor flat = stable_first_k(at::randn({m, n}), n / 3);
      SBFAST_CHECK(at::equal(sbfast::cpu::sharpbalance_masks(flat, 0), masks_by_hand(flat, false)));
      SBFAST_CHECK(at::equal(sbfast::cpu::sharpbalance_masks(flat, 1), masks_by_hand(flat, true)));
    }
  }
  return sbfast_test::report("test_select");
}
