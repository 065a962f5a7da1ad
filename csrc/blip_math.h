// Per-element BLIP math shared by the CPU (OpenMP) and CUDA kernels.
//
// Every function reproduces blip_kernels/reference.py operation by operation in
// fp32: the same ops in the same order, true divisions where the reference divides,
// and no implicit multiply-add contraction (build with -ffp-contract=off / nvcc
// --fmad=false). The only fused multiply-adds are the explicit fmaf calls in
// sgd_elem, which mirror torch's own kernels (see there). That order is what makes
// the backends bit-exact, so do not "simplify" an expression here without changing
// reference.py the same way.
//
// No torch headers: this file also builds the standalone C++ unit tests and the
// nvcc-only .cu files.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __CUDACC__
#define BLIP_HD __host__ __device__
#else
#define BLIP_HD
#endif

namespace blip {

//: fp32 constant of the bit-allocation rule: C = 0.5 / ln 2, rounded once from double
//: (as reference.GAIN_SCALE is turned into an fp32 tensor).
constexpr float kGainScale = static_cast<float>(0.5 / 0.693147180559945309417232121458176568);
constexpr float kFltMax = 3.402823466e+38f;

BLIP_HD inline float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

BLIP_HD inline uint32_t float_as_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

//: Exact 2^e for |e| <= 126, built from the exponent field: no exp2/ldexp call, so
//: CPU loops stay vectorizable and the value is exact by construction.
BLIP_HD inline float pow2i(int e) { return bits_as_float(static_cast<uint32_t>(127 + e) << 23); }

//: isfinite as one compare (NaN compares false), vectorizable and fast-math proof.
BLIP_HD inline bool is_finite(float x) { return fabsf(x) <= kFltMax; }

//: torch.minimum / torch.maximum for a limit b that is never NaN (here always a
//: bound-derived r or lim): a NaN in a propagates, as in torch. One compare and one
//: select, so CPU loops vectorize.
BLIP_HD inline float nan_min(float a, float b) { return a > b ? b : a; }
BLIP_HD inline float nan_max(float a, float b) { return a < b ? b : a; }

//: Round half to even, as rintf under the default rounding mode. On the host it is
//: spelled out (add/subtract 2^23) because a libm rintf call blocks SSE2
//: vectorization; csrc/tests checks it against nearbyintf, ties included.
BLIP_HD inline float rint_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  const float big = 8388608.0f;  // 2^23: from here on every float is an integer
  const float a = fabsf(x);
  // volatile-free: -ffp-contract=off and no -ffast-math keep (a + big) - big as written.
  const float r = (a + big) - big;
  return a < big ? copysignf(r, x) : x;  // also passes NaN and +-inf through
#endif
}

//: Section 1: q = rint((w / bound) * 2^bits) / 2^bits * bound; 0 where bits == 0.
BLIP_HD inline float quantize_elem(float w, int bits, float bound) {
  const float s = pow2i(bits);
  const float q = rint_even((w / bound) * s) / s * bound;
  return bits == 0 ? 0.0f : q;
}

//: Section 4: prev + clamp(w - prev, +-bound*2^-bits), then clamp to +-lim where
//: lim = bound*(1 - 2^-max_bit) (see project_limit). A NaN/Inf w is replaced by prev
//: first, so it still goes through the global clamp (prev may sit at +-bound).
BLIP_HD inline float project_elem(float w, float prev, int bits, float bound, float lim) {
  const float r = bound * pow2i(-bits);
  const float wf = is_finite(w) ? w : prev;
  const float out = prev + nan_max(nan_min(wf - prev, r), -r);
  return nan_min(nan_max(out, -lim), lim);
}

//: The clamp limit of section 4, computed as the reference does: (1 - 2^-max_bit)
//: in double, rounded to fp32 (exact for max_bit <= 24), times the fp32 bound.
BLIP_HD inline float project_limit(float bound, int max_bit) {
  return bound * static_cast<float>(1.0 - 1.0 / static_cast<double>(1u << max_bit));
}

//: Hyper-parameters of one SGD step, already rounded to fp32 like the reference's
//: 0-d tensors. Flags mirror the reference's Python-level branches.
struct SgdParams {
  float lr;
  float momentum;
  float one_minus_dampening;  // (1 - dampening) in double, then fp32
  float weight_decay;
  bool use_weight_decay;      // weight_decay != 0 (decided on the double)
  bool nesterov;
};

//: torch.optim.SGD's update of one element followed by section 4's projection.
//: A NaN/Inf gradient skips the element (w and buf unchanged, then projected).
//: Returns true when skipped. buf is ignored unless has_buf.
//:
//: Rounding, as torch 2.13 rounds SGD.step (checked bitwise over random inputs of
//: sizes 1..100000, and in ATen's source). Every `x.add(y, alpha=a)` of the step
//: (weight decay, the momentum add, nesterov, the weight update) is ONE rounding,
//: fma(y, a, x): on CPU ATen's add kernel is vec::fmadd(y, alpha, x), a hardware FMA
//: in its AVX2/AVX512 builds, and its scalar tail (n not a multiple of the vector
//: width) is fused too; on CUDA the foreach kernels compute op(x, alpha*y) in fp32
//: opmath and torch's nvcc build (default --fmad=true) contracts it to an FMA.
//: `buf.mul_(momentum)` is a separate rounding before the momentum add. The scalars
//: are double -> fp32 once (Scalar::to<float>), -lr included (= -fp32(lr)).
//: Exception: torch's DEFAULT (pre-AVX2) CPU build rounds twice; we fuse everywhere.
//: bf16/fp16 parameters: all math here is fp32 with an fp32 momentum buffer, rounded
//: once on store. torch differs by design there: its CPU add rounds alpha to the
//: parameter dtype and, in the scalar tail (n mod 32 with AVX512), rounds alpha*y to
//: the dtype before adding; its buffers and intermediates are in the dtype.
//: fmaf is exact on host and device (a libm call in the SSE2 copy of the CPU loops).
BLIP_HD inline bool sgd_elem(float& w, float g, float prev, int bits, float& buf, bool has_buf,
                             float bound, float lim, const SgdParams& p) {
  const bool ok = is_finite(g);
  g = ok ? g : 0.0f;
  if (p.use_weight_decay) g = fmaf(w, p.weight_decay, g);  // grad.add(param, alpha=wd)
  if (has_buf) {
    // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    const float nb = fmaf(g, p.one_minus_dampening, buf * p.momentum);
    buf = ok ? nb : buf;
    g = p.nesterov ? fmaf(nb, p.momentum, g) : nb;  // grad.add(buf, alpha=momentum)
  }
  const float stepped = ok ? fmaf(g, -p.lr, w) : w;  // param.add_(grad, alpha=-lr)
  w = project_elem(stepped, prev, bits, bound, lim);
  return !ok;
}

//: Sections 2 and 3 for one element: grow bits by the information gain, fold the
//: task's Fisher into the running average, zero it. t1 = task+1, t2 = task+2 (fp32).
//: NaN gain (0/0) grows nothing; +inf grows to max_bit.
BLIP_HD inline void update_bits_elem(uint8_t& bits, float& fisher, float& fisher_old, float t1,
                                     float t2, int max_bit) {
  const float f = fisher;
  const float fo = fisher_old;
  const float gain = kGainScale * logf((f + fo * t1) / (fo * t2));
  float grow = ceilf(gain);
  grow = grow > 0.0f ? grow : 0.0f;  // false for NaN as well
  const float cap = static_cast<float>(max_bit);
  grow = grow < cap ? grow : cap;  // compare in float so +inf cannot overflow the cast
  int nb = static_cast<int>(bits) + static_cast<int>(grow);
  nb = nb < max_bit ? nb : max_bit;
  bits = static_cast<uint8_t>(nb);
  fisher_old = (fo * t1 + f) / t2;
  fisher = 0.0f;
}

//: float -> bfloat16 bit pattern, round to nearest even; NaN -> 0x7fc0 (as c10).
//: Branch-free so the CPU store loops vectorize; CUDA uses __float2bfloat16_rn.
BLIP_HD inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_as_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
}

BLIP_HD inline float bf16_bits_to_float(uint16_t h) {
  return bits_as_float(static_cast<uint32_t>(h) << 16);
}

}  // namespace blip
