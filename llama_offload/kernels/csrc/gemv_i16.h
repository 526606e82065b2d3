// The CPU lane's int8/int4 products with integer dot products (cpu_gemv.cpp's quantized path where the shapes
// allow it, for a fp16 or bf16 model): x is rounded to int16 per group of elements, and the codes multiply it in 32-bit integer sums,
// 32 (AVX-512) or 16 (AVX2) products per instruction with no conversion of the codes to float.
//
// Why this keeps to the model's tolerance: a group's x is rounded to steps of max|x| / 32767, so each product
// is off by at most 2^-16 of the group's largest |x| times |w|. The model on the GPU rounds every dequantized
// weight to fp16 (2^-12 of each weight) and every result to fp16 (2^-12 of it): the error here is of that
// order or below it. The integer sums are exact (|q * xq| summed over 256 elements stays below 2^31).
//
// Per x group k of row r and token t: sum_i w_i x_i = s_w[r, k] * s_x[t, k] * sum_i q_i xq_i (+ the offsets,
// which cpu_gemv.cpp adds from the fp32 sums of x). The two scales are multiplied once per band of rows into a
// table the kernel reads a broadcast at a time.

#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#if defined(__AVX512BW__) || defined(__AVX2__)
#define LLAMA_OFFLOAD_I16 1

// 16 int16 lanes: AVX2, or AVX-512VL's 256-bit forms (groups of 32 int4 codes on an AVX-512 machine).
struct I256 {
  using iv = __m256i;
  using fv = __m256;
  static constexpr int kWords = 16;
  static iv zero() { return _mm256_setzero_si256(); }
  static fv fzero() { return _mm256_setzero_ps(); }
  static iv words(const int16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  // 16 bytes = 32 nibbles: lo holds elements 0, 2, ..., 30 of the 32, hi elements 1, 3, ..., 31.
  static void nibbles(const uint8_t* p, iv& lo, iv& hi) {
    const iv b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm256_and_si256(b, _mm256_set1_epi16(15));
    hi = _mm256_srli_epi16(b, 4);
  }
  static iv bytes(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // acc + the sums of adjacent products of a and b (int16 x int16 -> int32).
  static iv dot(iv acc, iv a, iv b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(acc, a, b);
#elif defined(__AVXVNNI__)
    return _mm256_dpwssd_avx_epi32(acc, a, b);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#endif
  }
  static fv scaled(iv acc, const float* s, fv total) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_broadcast_ss(s), total);
  }
  static float sum(fv a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#if defined(__AVX512BW__)
struct I512 {
  using iv = __m512i;
  using fv = __m512;
  static constexpr int kWords = 32;
  static iv zero() { return _mm512_setzero_si512(); }
  static fv fzero() { return _mm512_setzero_ps(); }
  static iv words(const int16_t* p) { return _mm512_loadu_si512(p); }
  // 32 bytes = 64 nibbles: lo holds elements 0, 2, ..., 62 of the 64, hi elements 1, 3, ..., 63.
  static void nibbles(const uint8_t* p, iv& lo, iv& hi) {
    const iv b = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    lo = _mm512_and_si512(b, _mm512_set1_epi16(15));
    hi = _mm512_srli_epi16(b, 4);
  }
  static iv bytes(const int8_t* p) { return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static iv dot(iv acc, iv a, iv b) {
#if defined(__AVX512VNNI__)
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
  }
  static fv scaled(iv acc, const float* s, fv total) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(*s), total);
  }
  static float sum(fv a) { return _mm512_reduce_add_ps(a); }
};
#endif

// Elements of x one vector step of V covers: a vector of codes is kWords int8, or 2 * kWords int4 nibbles.
template <class V, int Bits>
constexpr int64_t i16_step() { return Bits == 4 ? 2 * V::kWords : V::kWords; }

// The x group for weight groups of g elements: g itself up to 256 elements, else the largest multiple of the
// step up to 256 that divides g (per-channel int8). 0: no such group, the fp32 path runs.
inline int64_t i16_x_group(int64_t g, int64_t step) {
  if (g <= 256) return g % step == 0 ? g : 0;
  for (int64_t c = 256 / step * step; c >= step; c -= step)
    if (g % c == 0) return c;
  return 0;
}

// x (tokens, in) fp32 -> xq (tokens, in) int16 and sx (tokens, in / gx), per group of gx: xq = round(x / sx),
// sx = max|x| / 32767. For int4 each vector step's elements are reordered as V's nibbles come out of the codes
// (even elements, then odd). False where x is not finite: the fp32 path then gives the product's inf or nan.
template <class V, int Bits>
bool quantize_x(const float* x, int64_t tokens, int64_t in, int64_t gx, std::vector<int16_t>& xq,
                std::vector<float>& sx) {
  constexpr int64_t step = i16_step<V, Bits>();
  const int64_t nx = in / gx;
  xq.resize(tokens * in);
  sx.resize(tokens * nx);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < nx; ++k) {
      const float* xg = x + t * in + k * gx;
      float m = 0.f, probe = 0.f;  // probe: nan where an element is inf or nan (max would skip a nan)
      for (int64_t i = 0; i < gx; ++i) m = std::max(m, std::fabs(xg[i])), probe += xg[i] * 0.f;
      if (!std::isfinite(m) || probe != 0.f) return false;
      sx[t * nx + k] = m / 32767.f;
      const float inv = m > 0.f ? 32767.f / m : 0.f;
      int16_t* qg = xq.data() + t * in + k * gx;
      for (int64_t c = 0; c < gx; c += step)
        for (int64_t i = 0; i < step; ++i) {
          // int4: element c + i goes to the even half (i even) or the odd half of its step.
          const int64_t to = Bits == 4 ? (i % 2 ? step / 2 : 0) + i / 2 : i;
          qg[c + to] = static_cast<int16_t>(std::nearbyint(xg[c + i] * inv));
        }
    }
  return true;
}

// y[t * out + r] = off[r][t] + sum over x groups k of sfx[t, r, k] * (q_r . xq_t over group k), for R rows and
// NT tokens. sfx is addressed sfx[t * token_stride + r * nx + k]. The R rows share each load of x; each row and
// token keeps one integer sum per group and one float total.
template <class V, int Bits, int R, int NT>
void rows_i16(const uint8_t* q, int64_t row_bytes, const int16_t* xq, int64_t in, int64_t gx, const float* sfx,
              int64_t token_stride, const float (&off)[R][NT], float* y, int64_t out) {
  constexpr int64_t step = i16_step<V, Bits>();
  const int64_t nx = in / gx;
  typename V::fv total[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) total[r][t] = V::fzero();
  for (int64_t k = 0; k < nx; ++k) {
    typename V::iv acc[R][NT];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t] = V::zero();
    for (int64_t i = k * gx; i < (k + 1) * gx; i += step) {
      if constexpr (Bits == 4) {
        typename V::iv xl[NT], xh[NT];
        for (int t = 0; t < NT; ++t) xl[t] = V::words(xq + t * in + i), xh[t] = V::words(xq + t * in + i + V::kWords);
        for (int r = 0; r < R; ++r) {
          typename V::iv lo, hi;
          V::nibbles(q + r * row_bytes + i / 2, lo, hi);
          for (int t = 0; t < NT; ++t) acc[r][t] = V::dot(V::dot(acc[r][t], lo, xl[t]), hi, xh[t]);
        }
      } else {
        typename V::iv xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = V::words(xq + t * in + i);
        for (int r = 0; r < R; ++r) {
          const typename V::iv w = V::bytes(reinterpret_cast<const int8_t*>(q + r * row_bytes) + i);
          for (int t = 0; t < NT; ++t) acc[r][t] = V::dot(acc[r][t], w, xv[t]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) total[r][t] = V::scaled(acc[r][t], sfx + t * token_stride + r * nx + k, total[r][t]);
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * out + r] = V::sum(total[r][t]) + off[r][t];
}

#endif  // AVX-512BW or AVX2

}  // namespace
