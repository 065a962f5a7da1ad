// Unit tests of csrc/blip_math.h (no torch): the per-element math both the CPU and
// the CUDA kernels run. Plain asserts through a tiny CHECK macro; run by ctest.
#include <cfenv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>

#include "blip_math.h"

namespace {

int failures = 0;

#define CHECK(cond)                                                    \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

bool same_bits(float a, float b) { return blip::float_as_bits(a) == blip::float_as_bits(b); }

const float kInf = std::numeric_limits<float>::infinity();
const float kNaN = std::numeric_limits<float>::quiet_NaN();

void test_pow2_and_constants() {
  for (int e = -126; e <= 127; ++e) CHECK(blip::pow2i(e) == std::ldexp(1.0f, e));
  // float(0.5 / math.log(2.0)) as Python computes it.
  CHECK(blip::kGainScale == static_cast<float>(0.5 / std::log(2.0)));
  CHECK(blip::project_limit(1.0f, 20) == 1.0f - 1.0f / 1048576.0f);
  CHECK(blip::project_limit(2.0f, 24) == 2.0f * (1.0f - std::ldexp(1.0f, -24)));
}

void test_rint_matches_nearbyint() {
  std::fesetround(FE_TONEAREST);
  // Every tie k + 0.5 and its neighbours, both signs, across magnitudes.
  for (int k = -5000; k <= 5000; ++k) {
    const float t = static_cast<float>(k) + 0.5f;
    for (float v : {t, std::nextafter(t, kInf), std::nextafter(t, -kInf)}) {
      CHECK(same_bits(blip::rint_even(v), std::nearbyintf(v)));
    }
  }
  std::mt19937 rng(1);
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 2000000; ++i) {
    const float v = blip::bits_as_float(any(rng));
    if (v != v) continue;
    CHECK(same_bits(blip::rint_even(v), std::nearbyintf(v)));
  }
  CHECK(blip::rint_even(kInf) == kInf && blip::rint_even(-kInf) == -kInf);
  CHECK(std::isnan(blip::rint_even(kNaN)));
  CHECK(blip::rint_even(8388607.5f) == 8388608.0f);  // largest tie below 2^23
  CHECK(blip::rint_even(2.5f) == 2.0f && blip::rint_even(3.5f) == 4.0f);
  CHECK(same_bits(blip::rint_even(-0.5f), -0.0f));
}

void test_quantize() {
  // Ties at 2 bits on bound 1: steps of 0.25, ties at odd multiples of 0.125.
  CHECK(blip::quantize_elem(0.125f, 2, 1.0f) == 0.0f);
  CHECK(blip::quantize_elem(0.375f, 2, 1.0f) == 0.5f);
  CHECK(blip::quantize_elem(0.625f, 2, 1.0f) == 0.5f);
  CHECK(blip::quantize_elem(-0.875f, 2, 1.0f) == -1.0f);
  CHECK(blip::quantize_elem(0.3f, 0, 1.0f) == 0.0f);  // bits == 0 -> 0
  CHECK(blip::quantize_elem(kNaN, 0, 1.0f) == 0.0f);
  CHECK(std::isnan(blip::quantize_elem(kNaN, 3, 1.0f)));
  // No clamping: values beyond the bound stay beyond.
  CHECK(blip::quantize_elem(3.0f, 4, 1.0f) == 3.0f);
  // True division by bound (w / b, as the reference), then exact power-of-two scalings.
  const float w = 0.6006907f, b = 0.21428572f;
  const float s = 1048576.0f;
  CHECK(blip::quantize_elem(w, 20, b) == std::nearbyintf((w / b) * s) / s * b);
}

void test_project() {
  const float bound = 0.5f, lim = blip::project_limit(bound, 20);
  // Inside the interval: unchanged.
  CHECK(blip::project_elem(0.26f, 0.25f, 3, bound, lim) == 0.26f);
  // Beyond: prev +- bound * 2^-bits.
  CHECK(blip::project_elem(1.0f, 0.25f, 3, bound, lim) == 0.25f + 0.0625f);
  CHECK(blip::project_elem(-1.0f, 0.25f, 3, bound, lim) == 0.25f - 0.0625f);
  // bits == 0: free up to the global clamp.
  CHECK(blip::project_elem(7.0f, 0.0f, 0, bound, lim) == lim);
  CHECK(blip::project_elem(-7.0f, 0.0f, 0, bound, lim) == -lim);
  // Non-finite weights fall back to prev.
  CHECK(blip::project_elem(kNaN, 0.125f, 2, bound, lim) == 0.125f);
  CHECK(blip::project_elem(kInf, 0.125f, 2, bound, lim) == 0.125f);
  CHECK(blip::project_elem(-kInf, 0.125f, 0, bound, lim) == 0.125f);
  // A NaN prev (corrupt state) propagates, as torch.minimum/maximum do.
  CHECK(std::isnan(blip::project_elem(0.1f, kNaN, 3, bound, lim)));
  CHECK(std::isnan(blip::project_elem(kNaN, kNaN, 3, bound, lim)));
  // Randomized: result always within the allowed interval.
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i) {
    const int bits = i % 21;
    const float prev = blip::quantize_elem(u(rng) * bound, bits, bound);
    const float w = u(rng) * 2.0f;
    const float out = blip::project_elem(w, prev, bits, bound, lim);
    const float r = bound * blip::pow2i(-bits);
    CHECK(out >= -lim && out <= lim);
    CHECK(out - prev <= r && prev - out <= r);
  }
}

void test_sgd() {
  const float bound = 1.0f, lim = blip::project_limit(bound, 20);
  blip::SgdParams p{0.1f, 0.9f, 1.0f, 0.0f, false, false};
  float w = 0.5f, buf = 1.0f;
  // Non-finite gradient: skipped, weight and buffer unchanged.
  CHECK(blip::sgd_elem(w, kNaN, 0.5f, 0, buf, true, bound, lim, p));
  CHECK(w == 0.5f && buf == 1.0f);
  CHECK(blip::sgd_elem(w, -kInf, 0.5f, 0, buf, true, bound, lim, p));
  CHECK(w == 0.5f && buf == 1.0f);
  // Finite: buf = 0.9*1 + 1*g; w -= lr*buf, rounded once as torch's add_(alpha=-lr).
  CHECK(!blip::sgd_elem(w, 0.5f, 0.5f, 0, buf, true, bound, lim, p));
  CHECK(buf == 1.0f * 0.9f + 1.0f * 0.5f);
  CHECK(w == std::fma(buf, -0.1f, 0.5f));
  // Plain SGD with a projection that bites.
  float w2 = 0.5f, unused = 0.0f;
  CHECK(!blip::sgd_elem(w2, -100.0f, 0.5f, 4, unused, false, bound, lim, p));
  CHECK(w2 == 0.5f + 0.0625f);
}

// The SGD step rounds each `x + alpha*y` once (torch's add with alpha is an FMA),
// and nothing else is fused. Identity projection: bits 0, prev 0, a huge bound.
void test_sgd_rounds_like_torch() {
  const float bound = 1e30f, lim = blip::project_limit(bound, 20);
  // Exact case: (1+2^-11) - (1+2^-12)(1+2^-13) = 2^-13 - 2^-25 (one rounding, exact);
  // rounding the product first would give 2^-13.
  {
    const blip::SgdParams p{1.0f + 0x1p-13f, 0.0f, 1.0f, 0.0f, false, false};
    float w = 1.0f + 0x1p-11f, unused = 0.0f;
    CHECK(!blip::sgd_elem(w, 1.0f + 0x1p-12f, 0.0f, 0, unused, false, bound, lim, p));
    CHECK(w == 0x1p-13f - 0x1p-25f);
  }
  // Random operands, every branch: the same as the formula of torch.optim.SGD with
  // each add(alpha) an fma and mul_(momentum) a separate product; and the
  // two-rounding formula must disagree somewhere, so this check can fail.
  std::mt19937 rng(7);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  int fused_differs = 0;
  for (int i = 0; i < 20000; ++i) {
    const bool nesterov = i % 2 == 0;
    const float lr = 0.01f * (1.0f + std::fabs(n01(rng))), mom = 0.9f, damp1 = nesterov ? 1.0f : 0.7f;
    const float wd = 1e-2f;
    const blip::SgdParams p{lr, mom, damp1, wd, true, nesterov};
    const float w0 = n01(rng), g0 = n01(rng), b0 = n01(rng);
    float w = w0, buf = b0;
    CHECK(!blip::sgd_elem(w, g0, 0.0f, 0, buf, true, bound, lim, p));
    const float g1 = std::fma(w0, wd, g0);
    const float nb = std::fma(g1, damp1, b0 * mom);
    const float g2 = nesterov ? std::fma(nb, mom, g1) : nb;
    CHECK(buf == nb);
    CHECK(w == std::fma(g2, -lr, w0));
    const float tg1 = g0 + wd * w0, tnb = b0 * mom + damp1 * tg1;
    const float tg2 = nesterov ? tg1 + mom * tnb : tnb;
    fused_differs += (w0 - lr * tg2) != w;
  }
  CHECK(fused_differs > 0);
}

void test_update_bits() {
  const int max_bit = 20;
  auto run = [&](uint8_t bits, float f, float fo, int task) {
    float fisher = f, fisher_old = fo;
    blip::update_bits_elem(bits, fisher, fisher_old, float(task + 1), float(task + 2), max_bit);
    CHECK(fisher == 0.0f);
    return bits;
  };
  CHECK(run(3, 0.0f, 0.0f, 0) == 3);        // 0/0: NaN gain grows nothing
  CHECK(run(3, 1.0f, 0.0f, 0) == max_bit);  // x/0: +inf gain caps at max_bit
  CHECK(run(0, 0.0f, 1.0f, 0) == 0);        // negative gain: no growth
  CHECK(run(max_bit, 1e30f, 1e-30f, 0) == max_bit);
  // F = 3 Fo at task 0: log2(4/2)/2 = 0.5 -> ceil 1.
  CHECK(run(5, 3.0f, 1.0f, 0) == 6);
  // Running average fold.
  float fisher = 2.0f, fisher_old = 4.0f;
  uint8_t bits = 0;
  blip::update_bits_elem(bits, fisher, fisher_old, 2.0f, 3.0f, max_bit);  // task 1
  CHECK(fisher_old == (4.0f * 2.0f + 2.0f) / 3.0f);
  // NaN/Inf Fisher never produces bits above the cap.
  CHECK(run(19, kInf, 1.0f, 2) == max_bit);
  CHECK(run(19, kNaN, 1.0f, 2) == 19);
}

void test_bf16_rounding() {
  // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to even (1.0).
  CHECK(blip::float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);
  // 1 + 3*2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to even.
  CHECK(blip::float_to_bf16_bits(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);
  CHECK(blip::float_to_bf16_bits(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);
  CHECK(blip::float_to_bf16_bits(-2.0f) == 0xc000);
  CHECK(blip::float_to_bf16_bits(kInf) == 0x7f80);
  CHECK(blip::float_to_bf16_bits(3.4e38f) == 0x7f80);  // rounds past the largest bf16
  CHECK(std::isnan(blip::bf16_bits_to_float(blip::float_to_bf16_bits(kNaN))));
  // Round trip of every bf16 value that is finite.
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const float f = blip::bf16_bits_to_float(static_cast<uint16_t>(h));
    if (f != f) continue;
    CHECK(blip::float_to_bf16_bits(f) == h);
  }
}

}  // namespace

int main() {
  test_pow2_and_constants();
  test_rint_matches_nearbyint();
  test_quantize();
  test_project();
  test_sgd();
  test_sgd_rounds_like_torch();
  test_update_bits();
  test_bf16_rounding();
  if (failures != 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return EXIT_FAILURE;
  }
  std::printf("blip_math: all checks passed\n");
  return EXIT_SUCCESS;
}
