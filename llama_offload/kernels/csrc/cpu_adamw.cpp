// AdamW over fp32 master weights in host memory, with the moments stored as fp32, bf16 or blockwise int8 (the
// formats, and why v is stored as its rounded-up square root, are in llama_offload/train/host_adamw.py). One pass
// over memory a step: grad, master, m and v read once, master, m and v written once, nothing in between but a
// block on the stack, where torch's chunked path writes and reads fp32 copies of the moments. Every thread owns a
// range of whole blocks, so no result depends on the scheduling. Built at first use on the machine that runs it
// (native_build.py: -O3 -march=native -fopenmp).
//
// The loops are written on simd.h's vector type: GCC does not vectorize a loop that calls sqrt, whose errno
// (for a negative v, which cannot happen) is only turned off by a compiler flag, and the flags are the build's.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

constexpr int64_t kBlock = 256;  // int8: elements per scale (host_adamw.BLOCK)
constexpr float kTiny = 1e-30f;  // int8: the smallest block maximum a scale divides by (host_adamw.TINY)
constexpr int64_t kSpan = 4096;  // fp32 / bf16: elements a thread takes at a time

// bf16 stochastic rounding: 32 random bits an element from a hash of its index and a key (the unit and the step),
// the low 16 for m and the high 16 for v; host_adamw.py computes the same hash with torch's integer ops. Odd
// multipliers below 2**31, so that torch's int64 products of 32-bit values do not overflow.
constexpr uint32_t kIndexMul = 0x61C88647u, kMix1 = 0x7FEB352Du, kMix2 = 0x2C1B3C6Du;

inline uint32_t dither(uint32_t index, uint32_t key) {
  uint32_t h = index * kIndexMul + key;
  h ^= h >> 16;
  h *= kMix1;
  h ^= h >> 15;
  h *= kMix2;
  return h ^ (h >> 16);
}

// The scalars of one step, as T (float, or a vector of them broadcast).
template <typename T>
struct Hyper {
  T decay;     // 1 - lr * weight_decay
  T w1;        // 1 - beta1, m's lerp weight
  T beta2;
  T w2;        // 1 - beta2
  T neg_step;  // -lr / (1 - beta1^t)
  T bc2_sqrt;  // sqrt(1 - beta2^t)
  T eps;
};

inline float vsqrt(float x) { return std::sqrt(x); }

#ifndef LLAMA_OFFLOAD_SCALAR
#if defined(__AVX512F__)
using ivec = __m512i;
inline vec vsqrt(vec x) { return _mm512_sqrt_ps(x); }
inline vec load_u8(const uint8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline void store_bf16(uint16_t* p, vec x) {
  const __m512i u = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(r));
}
// Stochastic rounding: r (16 random bits a lane) added below the kept bits, then truncated.
inline void store_bf16(uint16_t* p, vec x, __m512i r) {
  __m512i b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(x), r), 16);
  b = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), b, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(b));
}
// dither() for kLanes consecutive indices from index: the low and high 16 bits.
inline void dither(uint32_t index, uint32_t key, __m512i& low, __m512i& high) {
  __m512i h = _mm512_add_epi32(_mm512_set1_epi32(index), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  h = _mm512_add_epi32(_mm512_mullo_epi32(h, _mm512_set1_epi32(kIndexMul)), _mm512_set1_epi32(key));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(kMix1));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 15));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(kMix2));
  h = _mm512_xor_si512(h, _mm512_srli_epi32(h, 16));
  low = _mm512_and_si512(h, _mm512_set1_epi32(0xFFFF));
  high = _mm512_srli_epi32(h, 16);
}
#else
using ivec = __m256i;
inline vec vsqrt(vec x) { return _mm256_sqrt_ps(x); }
inline vec load_u8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
inline void store_bf16(uint16_t* p, vec x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  // Every lane holds 16 bits: pack them (per 128-bit half), then bring the two halves' results together.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}
inline void store_bf16(uint16_t* p, vec x, __m256i r) {
  __m256i b = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(x), r), 16);
  b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0b1000);
  _mm_storeu_si128((__m128i*)p, _mm256_castsi256_si128(packed));
}
inline void dither(uint32_t index, uint32_t key, __m256i& low, __m256i& high) {
  __m256i h = _mm256_add_epi32(_mm256_set1_epi32(index), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  h = _mm256_add_epi32(_mm256_mullo_epi32(h, _mm256_set1_epi32(kIndexMul)), _mm256_set1_epi32(key));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(kMix1));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
  h = _mm256_mullo_epi32(h, _mm256_set1_epi32(kMix2));
  h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
  low = _mm256_and_si256(h, _mm256_set1_epi32(0xFFFF));
  high = _mm256_srli_epi32(h, 16);
}
#endif
#endif

// One element (or one vector of them) in torch.optim.AdamW's order, its single-tensor path; the compiler may fuse
// a multiply and an add, so the last bit can differ from torch's.
template <typename T>
inline void update(T& p, T g, T& m, T& v, const Hyper<T>& h) {
  p = p * h.decay;
  m = m + h.w1 * (g - m);  // lerp(m, g, w1), as torch computes it for a weight below 0.5
  v = v * h.beta2 + h.w2 * g * g;
  p = p + h.neg_step * m / (vsqrt(v) / h.bc2_sqrt + h.eps);
}

inline float bf16_to_f32(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, a NaN kept a NaN: c10::BFloat16's rounding.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

// Stochastic rounding with 16 random bits r: up with probability (the dropped bits) / 2**16, so unbiased.
inline uint16_t f32_to_bf16(float f, uint32_t r) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return f != f ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>((u + r) >> 16);
}

#ifndef LLAMA_OFFLOAD_SCALAR
Hyper<vec> broadcast(const Hyper<float>& h) {
  return {vset1(h.decay), vset1(h.w1), vset1(h.beta2), vset1(h.w2), vset1(h.neg_step), vset1(h.bc2_sqrt), vset1(h.eps)};
}
#endif

void step_fp32(float* p, const float* g, float* m, float* v, int64_t n, const Hyper<float>& h) {
  at::parallel_for(0, (n + kSpan - 1) / kSpan, 1, [=](int64_t s0, int64_t s1) {
    const int64_t end = std::min(n, s1 * kSpan);
    int64_t i = s0 * kSpan;
#ifndef LLAMA_OFFLOAD_SCALAR
    const Hyper<vec> hv = broadcast(h);
    for (; i + kLanes <= end; i += kLanes) {
      vec pi = vload(p + i), mi = vload(m + i), vi = vload(v + i);
      update(pi, vload(g + i), mi, vi, hv);
      vstore(p + i, pi);
      vstore(m + i, mi);
      vstore(v + i, vi);
    }
#endif
    for (; i < end; ++i) update(p[i], g[i], m[i], v[i], h);
  });
}

// key < 0: round to nearest even; else stochastic rounding with dither(index, key).
void step_bf16(float* p, const float* g, uint16_t* m, uint16_t* v, int64_t n, const Hyper<float>& h, int64_t key) {
  const bool sr = key >= 0;
  const uint32_t k = static_cast<uint32_t>(key);
  at::parallel_for(0, (n + kSpan - 1) / kSpan, 1, [=](int64_t s0, int64_t s1) {
    const int64_t end = std::min(n, s1 * kSpan);
    int64_t i = s0 * kSpan;
#ifndef LLAMA_OFFLOAD_SCALAR
    const Hyper<vec> hv = broadcast(h);
    for (; i + kLanes <= end; i += kLanes) {
      vec pi = vload(p + i), mi = load_bf16(m + i), vi = load_bf16(v + i);
      update(pi, vload(g + i), mi, vi, hv);
      vstore(p + i, pi);
      if (sr) {
        ivec rm, rv;
        dither(static_cast<uint32_t>(i), k, rm, rv);
        store_bf16(m + i, mi, rm);
        store_bf16(v + i, vi, rv);
      } else {
        store_bf16(m + i, mi);
        store_bf16(v + i, vi);
      }
    }
#endif
    for (; i < end; ++i) {
      float mi = bf16_to_f32(m[i]), vi = bf16_to_f32(v[i]);
      update(p[i], g[i], mi, vi, h);
      if (sr) {
        const uint32_t r = dither(static_cast<uint32_t>(i), k);
        m[i] = f32_to_bf16(mi, r & 0xFFFFu);
        v[i] = f32_to_bf16(vi, r >> 16);
      } else {
        m[i] = f32_to_bf16(mi);
        v[i] = f32_to_bf16(vi);
      }
    }
  });
}

// One block of the int8 storage: n (<= kBlock) parameters; the codes beyond n are padding and stay 0. After the
// update, the same operations in the same order as host_adamw.py's torch path.
void block_int8(float* p, const float* g, int8_t* mq, float* ms, uint8_t* vq, float* vs, int64_t n,
                const Hyper<float>& h) {
  alignas(64) float m[kBlock], s[kBlock];
  const float m_scale = *ms, v_scale = *vs;
  int64_t i = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
  const Hyper<vec> hv = broadcast(h);
  const vec mv_scale = vset1(m_scale), vv_scale = vset1(v_scale);
  for (; i + kLanes <= n; i += kLanes) {
    vec pi = vload(p + i), mi = load_i8(mq + i) * mv_scale, r = load_u8(vq + i) * vv_scale;
    vec vi = r * r;
    update(pi, vload(g + i), mi, vi, hv);
    vstore(p + i, pi);
    vstore(m + i, mi);
    vstore(s + i, vsqrt(vi));
  }
#endif
  for (; i < n; ++i) {
    float mi = static_cast<float>(mq[i]) * m_scale;
    const float r = static_cast<float>(vq[i]) * v_scale;
    float vi = r * r;
    update(p[i], g[i], mi, vi, h);
    m[i] = mi;
    s[i] = std::sqrt(vi);
  }
  for (; i < kBlock; ++i) m[i] = s[i] = 0.0f;
  float m_max = 0.0f, s_max = 0.0f;
#pragma omp simd reduction(max : m_max, s_max)
  for (int64_t j = 0; j < kBlock; ++j) {
    const float a = m[j] < 0.0f ? -m[j] : m[j];
    m_max = a > m_max ? a : m_max;
    s_max = s[j] > s_max ? s[j] : s_max;
  }
  m_max = m_max > kTiny ? m_max : kTiny;
  s_max = s_max > kTiny ? s_max : kTiny;
  *ms = m_max / 127.0f;
  *vs = s_max / 255.0f;
  const float m_inv = 127.0f / m_max, s_inv = 255.0f / s_max;
#pragma omp simd
  for (int64_t j = 0; j < kBlock; ++j) {
    // To nearest, ties to even (the default rounding mode), as torch.round; |m| <= m_max keeps it in [-127, 127].
    mq[j] = static_cast<int8_t>(std::nearbyint(m[j] * m_inv));
    // Up, so that no nonzero v becomes 0: truncate, then add one where that lost something; at most 255.
    const float x = s[j] * s_inv;
    int32_t c = static_cast<int32_t>(x);
    c += static_cast<float>(c) < x;
    vq[j] = static_cast<uint8_t>(c < 255 ? c : 255);
  }
}

void step_int8(float* p, const float* g, int8_t* mq, float* ms, uint8_t* vq, float* vs, int64_t n,
               const Hyper<float>& h) {
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 16, [=](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t at = b * kBlock;
      block_int8(p + at, g + at, mq + at, ms + b, vq + at, vs + b, std::min(kBlock, n - at), h);
    }
  });
}

void check(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.numel() == numel,
              "cpu_adamw.adamw_step: ", what, " must be a contiguous ", c10::toString(dtype), " CPU tensor of ",
              numel, " elements");
}

}  // namespace

// One AdamW step of param with grad; exp_avg and exp_avg_sq float32, bfloat16, or int8 and uint8 codes padded to
// whole blocks with their scales (one float32 each a block). step_size = lr / (1 - beta1^t) and
// bias_correction2_sqrt = sqrt(1 - beta2^t) come from the caller, computed as torch computes them. bf16 moments
// are rounded to nearest even where dither_key < 0, stochastically with dither(index, dither_key) otherwise.
void adamw_step(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                const c10::optional<at::Tensor>& exp_avg_scale, const c10::optional<at::Tensor>& exp_avg_sq_scale,
                double lr, double beta1, double beta2, double eps, double weight_decay, double step_size,
                double bias_correction2_sqrt, int64_t dither_key) {
  const int64_t n = param.numel();
  check(param, at::kFloat, n, "param");
  check(grad, at::kFloat, n, "grad");
  const Hyper<float> h{static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(1.0 - beta1),
                       static_cast<float>(beta2), static_cast<float>(1.0 - beta2), static_cast<float>(-step_size),
                       static_cast<float>(bias_correction2_sqrt), static_cast<float>(eps)};
  float* p = param.data_ptr<float>();
  const float* g = grad.data_ptr<float>();
  if (exp_avg.scalar_type() == at::kFloat) {
    check(exp_avg, at::kFloat, n, "exp_avg");
    check(exp_avg_sq, at::kFloat, n, "exp_avg_sq");
    step_fp32(p, g, exp_avg.data_ptr<float>(), exp_avg_sq.data_ptr<float>(), n, h);
  } else if (exp_avg.scalar_type() == at::kBFloat16) {
    check(exp_avg, at::kBFloat16, n, "exp_avg");
    check(exp_avg_sq, at::kBFloat16, n, "exp_avg_sq");
    step_bf16(p, g, static_cast<uint16_t*>(exp_avg.data_ptr()), static_cast<uint16_t*>(exp_avg_sq.data_ptr()), n, h,
              dither_key);
  } else {
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    check(exp_avg, at::kChar, blocks * kBlock, "exp_avg");
    check(exp_avg_sq, at::kByte, blocks * kBlock, "exp_avg_sq");
    TORCH_CHECK(exp_avg_scale.has_value() && exp_avg_sq_scale.has_value(),
                "cpu_adamw.adamw_step: int8 moments need their scales");
    check(*exp_avg_scale, at::kFloat, blocks, "exp_avg_scale");
    check(*exp_avg_sq_scale, at::kFloat, blocks, "exp_avg_sq_scale");
    step_int8(p, g, exp_avg.data_ptr<int8_t>(), exp_avg_scale->data_ptr<float>(), exp_avg_sq.data_ptr<uint8_t>(),
              exp_avg_sq_scale->data_ptr<float>(), n, h);
  }
}

TORCH_LIBRARY(llama_offload_cpu_adamw, m) {
  m.def("adamw_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
        "Tensor(d!)? exp_avg_scale, Tensor(e!)? exp_avg_sq_scale, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float step_size, float bias_correction2_sqrt, int dither_key=-1) -> ()",
        &adamw_step);
  m.def("isa() -> str", &simd_isa);
}
