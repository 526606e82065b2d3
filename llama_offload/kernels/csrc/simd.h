// The CPU lane's vector layer, shared by its kernels (cpu_gemv.cpp, cpu_attention.cpp): one fp32 vector type
// and the loads that turn weights or cached keys (fp16, bf16, int8, int4 nibbles) into it. AVX-512 where the
// compiler targets it (-march=native, native_build.py), AVX2 + F16C + FMA otherwise, and plain C++ beyond those
// (LLAMA_OFFLOAD_SCALAR: the kernels then take their scalar loops).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cstdint>
#include <string>

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline vec vset1(float s) { return _mm512_set1_ps(s); }
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline vec load_half(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline vec load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline vec load_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
// 16 bytes = 32 nibbles: the low nibbles (elements 0, 2, ..., 30) and the high ones (1, 3, ..., 31).
inline void load_nibbles(const uint8_t* p, vec& lo, vec& hi) {
  // vpermps reads the low 4 bits of each index: a 16-entry table lookup turns a nibble into its float.
  const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo = _mm512_permutexvar_ps(b, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
constexpr int kLanes = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline vec vset1(float s) { return _mm256_set1_ps(s); }
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vec load_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline vec load_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline vec load_i8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
// 8 bytes = 16 nibbles: elements 0, 2, ..., 14 low, 1, 3, ..., 15 high.
inline void load_nibbles(const uint8_t* p, vec& lo, vec& hi) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
  hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}
#else
#define LLAMA_OFFLOAD_SCALAR 1
#endif

inline float half_to_float(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }
inline float bf16_to_float(uint16_t h) { return static_cast<float>(c10::BFloat16(h, c10::BFloat16::from_bits())); }

// Which instructions this build uses: "avx512", "avx2" or "scalar" (reported by info and the benchmarks).
inline std::string simd_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(LLAMA_OFFLOAD_SCALAR)
  return "scalar";
#else
  return "avx2";
#endif
}

}  // namespace
