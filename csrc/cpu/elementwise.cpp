// Elementwise BLIP ops on CPU: one pass over memory, OpenMP over contiguous ranges,
// inner loops simple enough for the compiler to vectorize. The math is blip_math.h.
// Raw pointers, no ATen: this file compiles in seconds (the ATen glue is csrc/ops.cpp).
#include "elementwise.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdlib>

namespace blip::cpu {
namespace {

// Elements per OpenMP work item: large enough to amortize scheduling, small enough
// that a static schedule still splits a mid-sized tensor over both cores.
constexpr int64_t kGrain = 1 << 14;

// float load/store for the three parameter dtypes, rounding to nearest even on
// store as the reference's tensor.copy_ does. bf16 goes through the branch-free
// blip_math.h rounding (same bits as c10's, which branches and blocks vectorization).
template <typename T>
inline float ld(T v) {
  return static_cast<float>(v);
}
template <typename T>
inline T st(float f) {
  return static_cast<T>(f);
}
template <>
inline c10::BFloat16 st<c10::BFloat16>(float f) {
  return c10::BFloat16(float_to_bf16_bits(f), c10::BFloat16::from_bits());
}

// The build targets baseline x86-64 (SSE2) for portability, where these loops are
// compute-bound; each chunk therefore runs in one of two compiled copies, chosen at
// run time: baseline, or AVX2+FMA when the CPU has both (2x wider, then memory-bound).
// `flatten` inlines the whole loop into the copy, so AVX2 code exists only inside
// these TU-local functions. -ffp-contract=off keeps every a*b+c unfused; the only FMAs
// are blip_math.h's explicit fmaf calls (SGD, as torch rounds it): one instruction in
// the AVX2 copy, a libm call in the baseline copy (same bits, slower).
// BLIP_CPU_NO_AVX2=1 forces the baseline copy (tests compare both).
template <typename Fn>
[[gnu::flatten]] int64_t run_base(const Fn& fn, int64_t b, int64_t e) {
  return fn(b, e);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename Fn>
[[gnu::flatten, gnu::target("avx2,fma")]] int64_t run_avx2(const Fn& fn, int64_t b, int64_t e) {
  return fn(b, e);
}

bool use_avx2() {
  static const bool yes = [] {
    const char* off = std::getenv("BLIP_CPU_NO_AVX2");
    if (off != nullptr && off[0] != '\0' && off[0] != '0') return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0;
  }();
  return yes;
}
#endif

// Runs fn(begin, end) -> count over [0, n) in chunks; returns the summed count.
template <typename Fn>
int64_t parallel_count(int64_t n, const Fn& fn) {
  const int64_t chunks = (n + kGrain - 1) / kGrain;
#if defined(__x86_64__) && defined(__GNUC__)
  const bool avx2 = use_avx2();
#else
  const bool avx2 = false;
#endif
  int64_t count = 0;
#pragma omp parallel for schedule(static) reduction(+ : count) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * kGrain, e = std::min(n, (c + 1) * kGrain);
#if defined(__x86_64__) && defined(__GNUC__)
    count += avx2 ? run_avx2(fn, b, e) : run_base(fn, b, e);
#else
    count += run_base(fn, b, e);
#endif
  }
  return count;
}

template <typename Fn>
void dispatch_param(Dtype t, const Fn& fn) {
  switch (t) {
    case Dtype::kF32:
      return fn(float{});
    case Dtype::kBF16:
      return fn(c10::BFloat16{});
    case Dtype::kF16:
      return fn(c10::Half{});
  }
}

// Each *_range function handles [b, e) with every scalar a by-value local: captured
// by reference, a float scalar could alias the float stores and keep the loop from
// being hoisted and vectorized.

template <typename T>
int64_t quantize_range(const T* __restrict__ w, const uint8_t* __restrict__ bits,
                       T* __restrict__ out, int64_t b, int64_t e, float bound) {
  for (int64_t i = b; i < e; ++i) out[i] = st<T>(quantize_elem(ld(w[i]), bits[i], bound));
  return 0;
}

template <typename T>
int64_t project_range(T* __restrict__ w, const float* __restrict__ prev,
                      const uint8_t* __restrict__ bits, int64_t b, int64_t e, float bound,
                      float lim) {
  int32_t bad = 0;
  for (int64_t i = b; i < e; ++i) {
    const float wi = ld(w[i]);
    bad += !is_finite(wi);
    w[i] = st<T>(project_elem(wi, prev[i], bits[i], bound, lim));
  }
  return bad;
}

// kBuf and kWd are template flags so each instantiation is a branch-free loop.
template <typename T, bool kBuf, bool kWd>
int64_t sgd_range(T* __restrict__ w, const T* __restrict__ grad, const float* __restrict__ prev,
                  const uint8_t* __restrict__ bits, float* __restrict__ buf, int64_t b, int64_t e,
                  float bound, float lim, float lr, float momentum, float one_minus_dampening,
                  float weight_decay, bool nesterov) {
  const SgdParams p{lr, momentum, one_minus_dampening, weight_decay, kWd, nesterov};
  int32_t skipped = 0;
  for (int64_t i = b; i < e; ++i) {
    float wi = ld(w[i]);
    float bi = kBuf ? buf[i] : 0.0f;
    skipped += sgd_elem(wi, ld(grad[i]), prev[i], bits[i], bi, kBuf, bound, lim, p);
    w[i] = st<T>(wi);
    if (kBuf) buf[i] = bi;
  }
  return skipped;
}

template <typename T, bool kBuf, bool kWd>
int64_t sgd_kernel(T* w, const T* grad, const float* prev, const uint8_t* bits, float* buf,
                   int64_t n, float bound, float lim, const SgdParams& p) {
  const float lr = p.lr, mom = p.momentum, omd = p.one_minus_dampening, wd = p.weight_decay;
  const bool nesterov = p.nesterov;
  return parallel_count(n, [=](int64_t b, int64_t e) {
    return sgd_range<T, kBuf, kWd>(w, grad, prev, bits, buf, b, e, bound, lim, lr, mom, omd, wd,
                                   nesterov);
  });
}

template <typename T>
int64_t sync_range(T* __restrict__ w, float* __restrict__ prev, const uint8_t* __restrict__ bits,
                   int64_t b, int64_t e, float bound) {
  for (int64_t i = b; i < e; ++i) {
    const T q = st<T>(quantize_elem(ld(w[i]), bits[i], bound));
    w[i] = q;
    prev[i] = ld(q);  // prev holds the stored (rounded) weight, as prev.copy_(w.float())
  }
  return 0;
}

int64_t update_bits_range(uint8_t* __restrict__ bits, float* __restrict__ fisher,
                          float* __restrict__ fisher_old, int64_t b, int64_t e, float t1,
                          float t2, int max_bit) {
  for (int64_t i = b; i < e; ++i) update_bits_elem(bits[i], fisher[i], fisher_old[i], t1, t2, max_bit);
  return 0;
}

}  // namespace

void quantize(const void* w, const uint8_t* bits, void* out, int64_t n, Dtype dtype, float bound) {
  dispatch_param(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* wp = static_cast<const T*>(w);
    T* op = static_cast<T*>(out);
    parallel_count(n, [=](int64_t b, int64_t e) { return quantize_range<T>(wp, bits, op, b, e, bound); });
  });
}

int64_t project(void* w, const float* prev, const uint8_t* bits, int64_t n, Dtype dtype,
                float bound, float lim) {
  int64_t bad = 0;
  dispatch_param(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* wp = static_cast<T*>(w);
    bad = parallel_count(n, [=](int64_t b, int64_t e) {
      return project_range<T>(wp, prev, bits, b, e, bound, lim);
    });
  });
  return bad;
}

int64_t sgd_step(void* w, const void* grad, const float* prev, const uint8_t* bits, float* buf,
                 int64_t n, Dtype dtype, float bound, float lim, const SgdParams& p) {
  int64_t skipped = 0;
  dispatch_param(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* wp = static_cast<T*>(w);
    const T* gp = static_cast<const T*>(grad);
    if (buf != nullptr) {
      skipped = p.use_weight_decay
                    ? sgd_kernel<T, true, true>(wp, gp, prev, bits, buf, n, bound, lim, p)
                    : sgd_kernel<T, true, false>(wp, gp, prev, bits, buf, n, bound, lim, p);
    } else {
      skipped = p.use_weight_decay
                    ? sgd_kernel<T, false, true>(wp, gp, prev, bits, buf, n, bound, lim, p)
                    : sgd_kernel<T, false, false>(wp, gp, prev, bits, buf, n, bound, lim, p);
    }
  });
  return skipped;
}

void update_bits(uint8_t* bits, float* fisher, float* fisher_old, int64_t n, float t1, float t2,
                 int max_bit) {
  parallel_count(n, [=](int64_t b, int64_t e) {
    return update_bits_range(bits, fisher, fisher_old, b, e, t1, t2, max_bit);
  });
}

void sync(void* w, float* prev, const uint8_t* bits, int64_t n, Dtype dtype, float bound) {
  dispatch_param(dtype, [&](auto tag) {
    using T = decltype(tag);
    T* wp = static_cast<T*>(w);
    parallel_count(n, [=](int64_t b, int64_t e) { return sync_range<T>(wp, prev, bits, b, e, bound); });
  });
}

}  // namespace blip::cpu
