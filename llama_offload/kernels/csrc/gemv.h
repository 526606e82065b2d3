// The CPU kernels' matrix-vector products: y (tokens, out) = x (tokens, in) @ W^T for a few tokens, W read once.
// Shared by the per-matrix operators (cpu_gemv.cpp) and the fused decode step of a block (cpu_block.cpp).
//
// A decode step on the host reads every weight of a block once per token group, so the kernel's only job is to
// stream W at the memory's speed: each thread takes a band of rows, converts a row's weights to fp32 in
// registers (16-bit floats, or int8/int4 codes with their group scales) and multiplies them into every token
// of a tile, accumulating in fp32. at::parallel_for shares torch's thread pool, so torch.set_num_threads sets
// the lane's threads.
//
// Formats (quant.py): int8 (out, in); int4 uint8 (out, in / 2), element 2j in the low nibble of byte j; scales
// and optional mins (out, in / g) in fp16 or fp32. With mins w = q * s + m (int4 q in 0..15); without,
// w = q * s (int4 q read as n - 8). Per group, sum_i w_i x_i = s * sum_i q_i x_i + c * sum_i x_i with c = m,
// or c = -8 s for int4 without mins, so the codes multiply x as small integers and the group's sum of x
// (computed once per call) carries the offset. Where the groups fit the vectors, the codes multiply x rounded to
// int16 in integer dot products (gemv_i16.h), about twice as fast as converting every code to fp32; elsewhere
// (odd group sizes, no AVX2, fp32 activations) the codes are converted.

#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemv_i16.h"
#include "simd.h"

namespace {

constexpr int kTile = 4;  // tokens multiplied per pass over a row (the row stays in L1 between tiles)

// f(std::integral_constant<int, NT>{}) for a tile of nt tokens (1..kTile): the kernels take NT as a template
// argument, so their accumulators are registers.
template <class F>
void by_tile(int64_t nt, F&& f) {
  switch (nt) {
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    default: f(std::integral_constant<int, 1>{}); break;
  }
}

int64_t grain_for(int64_t rows) {
  // Bands of rows small enough to spread over every thread, large enough to amortize the scheduling.
  int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  return std::max<int64_t>(8, rows / (threads * 8));
}

// --- 16-bit weights -------------------------------------------------------------------------------------
//
// R rows at once: R independent streams through memory keep more loads in flight than one row at a time
// (a row of 4096 fp16 weights is only 8 KB), and R * NT independent accumulators hide the FMA latency.

template <bool kBf16>
inline float weight16(const uint16_t* w, int64_t i) { return kBf16 ? bf16_to_float(w[i]) : half_to_float(w[i]); }

template <bool kBf16, int R, int NT>
void rows16(const uint16_t* w, const float* x, int64_t in, float* y, int64_t out) {
  float sums[R][NT];
  int64_t i = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
  vec acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = vzero();
  for (; i + kLanes <= in; i += kLanes) {
    vec xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = vload(x + t * in + i);
    for (int r = 0; r < R; ++r) {
      vec wv = kBf16 ? load_bf16(w + r * in + i) : load_half(w + r * in + i);
      for (int t = 0; t < NT; ++t) acc[r][t] = vfma(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) sums[r][t] = vsum(acc[r][t]);
#else
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) sums[r][t] = 0.f;
#endif
  for (; i < in; ++i)
    for (int r = 0; r < R; ++r) {
      const float wi = weight16<kBf16>(w + r * in, i);
      for (int t = 0; t < NT; ++t) sums[r][t] += wi * x[t * in + i];
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) y[t * out + r] = sums[r][t];
}

// Rows [r0, r1) for a tile of NT tokens: R rows at a time, then the rest one by one.
template <bool kBf16, int NT>
void band16(const uint16_t* w, const float* x, int64_t in, float* y, int64_t out, int64_t r0, int64_t r1) {
  constexpr int R = NT == 1 ? 4 : 2;
  int64_t r = r0;
  for (; r + R <= r1; r += R) rows16<kBf16, R, NT>(w + r * in, x, in, y + r, out);
  for (; r < r1; ++r) rows16<kBf16, 1, NT>(w + r * in, x, in, y + r, out);
}

template <bool kBf16>
void gemv16(const uint16_t* w, const float* x, int64_t tokens, int64_t in, int64_t out, float* y) {
  at::parallel_for(0, out, grain_for(out), [&](int64_t r0, int64_t r1) {
    // Bands of 64 rows: each band is read once from memory, then again from the cache for each further tile.
    for (int64_t b0 = r0; b0 < r1; b0 += 64) {
      const int64_t b1 = std::min(b0 + 64, r1);
      for (int64_t t = 0; t < tokens; t += kTile) {
        const float* xt = x + t * in;
        float* yt = y + t * out;
        by_tile(std::min<int64_t>(kTile, tokens - t), [&](auto nt) {
          band16<kBf16, decltype(nt)::value>(w, xt, in, yt, out, b0, b1);
        });
      }
    }
  });
}

// --- int8 and int4 codes with group scales ---------------------------------------------------------------
//
// Each group's products stay in vector accumulators, scaled into the row's total by a broadcast of the group's
// scale: no horizontal sum per group. The offsets (sum over groups of c * the group's sum of x) are one short
// dot product per row and token at the end.

#ifndef LLAMA_OFFLOAD_SCALAR
constexpr int kChunk8 = kLanes;      // int8 elements per vector step
constexpr int kChunk4 = 2 * kLanes;  // int4 elements per vector step: kLanes bytes
#else
constexpr int kChunk8 = 1;
constexpr int kChunk4 = 2;
#endif

struct Groups {
  int64_t count, size;      // groups per row, elements per group
  std::vector<float> xsum;  // (tokens, count): each group's sum of x
};

template <typename S>
inline float to_float(S v) { return static_cast<float>(v); }

// n scales (fp16 or fp32) -> fp32, a vector at a time: per row this runs once per group, so a scalar fp16
// conversion here costs as much as the group's products.
template <typename S>
void scales_fp32(const S* s, int64_t n, float* out) {
  int64_t k = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
  for (; k + kLanes <= n; k += kLanes) {
    if constexpr (std::is_same_v<S, float>) vstore(out + k, vload(s + k));
    else vstore(out + k, load_half(reinterpret_cast<const uint16_t*>(s + k)));
  }
#endif
  for (; k < n; ++k) out[k] = to_float(s[k]);
}

// One row's scales and offsets (c = min, or -8 * scale for int4 without mins, else 0) in fp32.
template <int Bits, typename S>
void row_scales(const S* s, const S* m, int64_t count, float* sf, float* cf) {
  scales_fp32(s, count, sf);
  if (m) scales_fp32(m, count, cf);
  else for (int64_t k = 0; k < count; ++k) cf[k] = Bits == 4 ? -8.f * sf[k] : 0.f;
}

// sum_k a[k] * b[k] in fp32.
inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  int64_t k = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
  vec acc = vzero();
  for (; k + kLanes <= n; k += kLanes) acc = vfma(vload(a + k), vload(b + k), acc);
  s = vsum(acc);
#endif
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

// y[r, t] for R rows and NT tokens: sum over groups of scale * (q . x) + offset * sum(x). The R rows share
// each load of x, and their 2 * R * NT accumulators are independent chains: one row's single chain would
// wait on the FMA latency at every step. sf and cf hold the R rows' scales and offsets, g.count apart.
template <int Bits, int R, int NT>
void rows_quant(const uint8_t* q, int64_t row_bytes, const float* sf, const float* cf, const float* x, int64_t in,
                const Groups& g, const float* xsum, float* y, int64_t out) {
  constexpr int64_t chunk = Bits == 8 ? kChunk8 : kChunk4;
#ifndef LLAMA_OFFLOAD_SCALAR
  const int64_t full = g.size / chunk * chunk;  // elements of each group the vector loop covers
#else
  const int64_t full = 0;  // no vector loop: the tail loop covers every element
#endif
  float sums[R][NT];
#ifndef LLAMA_OFFLOAD_SCALAR
  vec total[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) total[r][t] = vzero();
#endif
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) sums[r][t] = 0.f;
  for (int64_t k = 0; k < g.count; ++k) {
    const int64_t a = k * g.size;
#ifndef LLAMA_OFFLOAD_SCALAR
    vec acc[R][NT][2];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < NT; ++t) acc[r][t][0] = acc[r][t][1] = vzero();
    int64_t i = a;
    if (Bits == 8) {
      // Two chunks per step, one per accumulator.
      for (; i + 2 * chunk <= a + full; i += 2 * chunk) {
        vec x0[NT], x1[NT];
        for (int t = 0; t < NT; ++t) x0[t] = vload(x + t * in + i), x1[t] = vload(x + t * in + i + kLanes);
        for (int r = 0; r < R; ++r) {
          const int8_t* qr = reinterpret_cast<const int8_t*>(q + r * row_bytes);
          const vec w0 = load_i8(qr + i), w1 = load_i8(qr + i + kLanes);
          for (int t = 0; t < NT; ++t) {
            acc[r][t][0] = vfma(w0, x0[t], acc[r][t][0]);
            acc[r][t][1] = vfma(w1, x1[t], acc[r][t][1]);
          }
        }
      }
      for (; i < a + full; i += chunk) {
        for (int r = 0; r < R; ++r) {
          const vec w0 = load_i8(reinterpret_cast<const int8_t*>(q + r * row_bytes) + i);
          for (int t = 0; t < NT; ++t) acc[r][t][0] = vfma(w0, vload(x + t * in + i), acc[r][t][0]);
        }
      }
    } else {
      for (; i < a + full; i += chunk) {
        vec x0[NT], x1[NT];
        for (int t = 0; t < NT; ++t) x0[t] = vload(x + t * in + i), x1[t] = vload(x + t * in + i + kLanes);
        for (int r = 0; r < R; ++r) {
          vec lo, hi;
          load_nibbles(q + r * row_bytes + i / 2, lo, hi);
          for (int t = 0; t < NT; ++t) {
            acc[r][t][0] = vfma(lo, x0[t], acc[r][t][0]);
            acc[r][t][1] = vfma(hi, x1[t], acc[r][t][1]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const vec scale = vset1(sf[r * g.count + k]);
      for (int t = 0; t < NT; ++t) total[r][t] = vfma(acc[r][t][0] + acc[r][t][1], scale, total[r][t]);
    }
#endif
    // A group's tail the vectors do not cover (unpermuted): int8 element by element, int4 by byte pairs.
    for (int64_t i = a + full; i < a + g.size; i += (Bits == 8 ? 1 : 2)) {
      for (int r = 0; r < R; ++r) {
        const uint8_t* qr = q + r * row_bytes;
        for (int t = 0; t < NT; ++t) {
          const float* xt = x + t * in;
          const float d = Bits == 8 ? float(reinterpret_cast<const int8_t*>(qr)[i]) * xt[i]
                                    : float(qr[i / 2] & 15) * xt[i] + float(qr[i / 2] >> 4) * xt[i + 1];
          sums[r][t] += sf[r * g.count + k] * d;
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) {
#ifndef LLAMA_OFFLOAD_SCALAR
      sums[r][t] += vsum(total[r][t]);
#endif
      y[t * out + r] = sums[r][t] + dot(cf + r * g.count, xsum + t * g.count, g.count);
    }
}

// Rows [r0, r1) for a tile of NT tokens: R rows at a time, then the rest one by one.
template <int Bits, int NT>
void band_quant(const uint8_t* codes, int64_t row_bytes, const float* sf, const float* cf, const float* x, int64_t in,
                const Groups& g, const float* xsum, float* y, int64_t out, int64_t r0, int64_t r1) {
  constexpr int R = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  int64_t r = r0;
  for (; r + R <= r1; r += R)
    rows_quant<Bits, R, NT>(codes + r * row_bytes, row_bytes, sf + (r - r0) * g.count, cf + (r - r0) * g.count, x,
                            in, g, xsum, y + r, out);
  for (; r < r1; ++r)
    rows_quant<Bits, 1, NT>(codes + r * row_bytes, row_bytes, sf + (r - r0) * g.count, cf + (r - r0) * g.count, x,
                            in, g, xsum, y + r, out);
}

#ifdef LLAMA_OFFLOAD_I16
// --- int8 and int4 codes against int16 activations (gemv_i16.h) ----------------------------------------------

// A band's combined scales for a tile of tokens: sfx[(t * rows + r) * nx + k] = sf[r, k / per] * sx[t, k], per
// being the x groups in a weight group (1, or more for per-channel int8).
void tile_scales(const float* sf, int64_t count, const float* sx, int64_t nx, int64_t rows, int64_t tokens,
                 float* sfx) {
  const int64_t per = nx / count;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      const float* s = sf + r * count;
      const float* xs = sx + t * nx;
      float* d = sfx + (t * rows + r) * nx;
      if (per == 1) {
        for (int64_t k = 0; k < nx; ++k) d[k] = s[k] * xs[k];
      } else {
        for (int64_t kw = 0; kw < count; ++kw)
          for (int64_t j = 0; j < per; ++j) d[kw * per + j] = s[kw] * xs[kw * per + j];
      }
    }
}

// Rows [r0, r1) of a band starting at b0 for a tile of NT tokens: R rows at a time, then the rest one by one.
template <class V, int Bits, int NT>
void band_i16(const uint8_t* codes, int64_t row_bytes, const float* cf, bool offsets, const int16_t* xq,
              int64_t in, int64_t gx, const float* sfx, const Groups& g, const float* xsum, float* y, int64_t out,
              int64_t b0, int64_t b1) {
  constexpr int R = NT == 1 ? 4 : NT == 2 ? 2 : 1;
  const int64_t nx = in / gx, token_stride = (b1 - b0) * nx;
  auto run = [&](auto rows, int64_t r) {
    constexpr int kR = decltype(rows)::value;
    float off[kR][NT];
    for (int i = 0; i < kR; ++i)
      for (int t = 0; t < NT; ++t)
        off[i][t] = offsets ? dot(cf + (r - b0 + i) * g.count, xsum + t * g.count, g.count) : 0.f;
    rows_i16<V, Bits, kR, NT>(codes + r * row_bytes, row_bytes, xq, in, gx, sfx + (r - b0) * nx, token_stride, off,
                              y + r, out);
  };
  int64_t r = b0;
  for (; r + R <= b1; r += R) run(std::integral_constant<int, R>{}, r);
  for (; r < b1; ++r) run(std::integral_constant<int, 1>{}, r);
}

// gemv_quant's product with x rounded to int16 per group of gx (a divisor of the weight group, a multiple of
// V's step). False where x is not finite (nothing written).
template <class V, int Bits, typename S>
bool gemv_quant_i16(const void* codes, const S* scales, const S* mins, const float* x, int64_t tokens, int64_t in,
                    int64_t out, const Groups& g, int64_t gx, float* y) {
  std::vector<int16_t> xq;
  std::vector<float> sx;
  if (!quantize_x<V, Bits>(x, tokens, in, gx, xq, sx)) return false;
  const int64_t row_bytes = Bits == 8 ? in : in / 2, nx = in / gx;
  const bool offsets = mins != nullptr || Bits == 4;
  const uint8_t* q = static_cast<const uint8_t*>(codes);
  at::parallel_for(0, out, grain_for(out), [&](int64_t r0, int64_t r1) {
    std::vector<float> sf(64 * g.count), cf(64 * g.count), sfx(kTile * 64 * nx);
    for (int64_t b0 = r0; b0 < r1; b0 += 64) {
      const int64_t b1 = std::min(b0 + 64, r1);
      for (int64_t r = b0; r < b1; ++r)
        row_scales<Bits>(scales + r * g.count, mins ? mins + r * g.count : nullptr, g.count,
                         sf.data() + (r - b0) * g.count, cf.data() + (r - b0) * g.count);
      for (int64_t t = 0; t < tokens; t += kTile) {
        const int64_t nt = std::min<int64_t>(kTile, tokens - t);
        tile_scales(sf.data(), g.count, sx.data() + t * nx, nx, b1 - b0, nt, sfx.data());
        const int16_t* xt = xq.data() + t * in;
        const float* xs = g.xsum.data() + t * g.count;
        float* yt = y + t * out;
        by_tile(nt, [&](auto tile) {
          band_i16<V, Bits, decltype(tile)::value>(q, row_bytes, cf.data(), offsets, xt, in, gx, sfx.data(), g, xs,
                                                   yt, out, b0, b1);
        });
      }
    }
  });
  return true;
}
#endif

// The integer path where it applies (the widest vectors whose step divides the groups); false: run the fp32 one.
template <int Bits, typename S>
bool try_quant_i16(const void* codes, const S* scales, const S* mins, const float* x, int64_t tokens, int64_t in,
                   int64_t out, const Groups& g, float* y) {
#ifdef LLAMA_OFFLOAD_I16
#if defined(__AVX512BW__)
  if (const int64_t gx = i16_x_group(g.size, i16_step<I512, Bits>()))
    return gemv_quant_i16<I512, Bits>(codes, scales, mins, x, tokens, in, out, g, gx, y);
#endif
  if (const int64_t gx = i16_x_group(g.size, i16_step<I256, Bits>()))
    return gemv_quant_i16<I256, Bits>(codes, scales, mins, x, tokens, in, out, g, gx, y);
#endif
  return false;
}

// x (tokens, in) reordered so that within every group's full chunks of kChunk4 elements the even elements come
// first and the odd ones after: the order load_nibbles yields them in.
std::vector<float> int4_order(const float* x, int64_t tokens, int64_t in, int64_t group) {
  std::vector<float> p(x, x + tokens * in);
  const int64_t full = group / kChunk4 * kChunk4;
  if (kChunk4 == 2) return p;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t a = 0; a < in; a += group)
      for (int64_t c = a; c < a + full; c += kChunk4)
        for (int64_t l = 0; l < kChunk4 / 2; ++l) {
          p[t * in + c + l] = x[t * in + c + 2 * l];
          p[t * in + c + kChunk4 / 2 + l] = x[t * in + c + 2 * l + 1];
        }
  return p;
}

template <int Bits, typename S>
void gemv_quant(const void* codes, const S* scales, const S* mins, const float* x, int64_t tokens, int64_t in,
                int64_t out, const Groups& g, float* y) {
  const int64_t row_bytes = Bits == 8 ? in : in / 2;
  const uint8_t* q = static_cast<const uint8_t*>(codes);
  at::parallel_for(0, out, grain_for(out), [&](int64_t r0, int64_t r1) {
    // Bands of 64 rows, as gemv16: the band's scales in fp32, then each tile of tokens over the band.
    std::vector<float> sf(64 * g.count), cf(64 * g.count);
    for (int64_t b0 = r0; b0 < r1; b0 += 64) {
      const int64_t b1 = std::min(b0 + 64, r1);
      for (int64_t r = b0; r < b1; ++r)
        row_scales<Bits>(scales + r * g.count, mins ? mins + r * g.count : nullptr, g.count,
                         sf.data() + (r - b0) * g.count, cf.data() + (r - b0) * g.count);
      for (int64_t t = 0; t < tokens; t += kTile) {
        const float* xt = x + t * in;
        const float* xs = g.xsum.data() + t * g.count;
        float* yt = y + t * out;
        by_tile(std::min<int64_t>(kTile, tokens - t), [&](auto nt) {
          band_quant<Bits, decltype(nt)::value>(q, row_bytes, sf.data(), cf.data(), xt, in, g, xs, yt, out, b0, b1);
        });
      }
    }
  });
}

// y (tokens, out) fp32 = x (tokens, in) fp32 @ dequantize(codes, scales, mins)^T, codes int8 (out, in) or int4
// uint8 (out, in / 2) as quant.py lays them out, scales and mins (out, groups) fp16 or fp32, checked by the
// caller. i16: x rounded to int16 per group for integer dot products where the shapes and the build allow.
void quant_product(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor* mins, const float* x,
                   int64_t tokens, bool i16, float* y) {
  const bool int4 = codes.scalar_type() == at::kByte;
  const int64_t out = codes.size(0), in = int4 ? 2 * codes.size(1) : codes.size(1);
  Groups g{scales.size(1), in / scales.size(1), {}};
  g.xsum.assign(tokens * g.count, 0.f);
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t k = 0; k < g.count; ++k) {
      const float* xg = x + t * in + k * g.size;
      float sum = 0.f;
      for (int64_t i = 0; i < g.size; ++i) sum += xg[i];
      g.xsum[t * g.count + k] = sum;
    }
  const void* q = codes.data_ptr();
  auto run = [&](const auto* s, const auto* m) {
    if (int4) {
      if (i16 && try_quant_i16<4>(q, s, m, x, tokens, in, out, g, y)) return;
      const std::vector<float> xp = int4_order(x, tokens, in, g.size);
      gemv_quant<4>(q, s, m, xp.data(), tokens, in, out, g, y);
    } else {
      if (i16 && try_quant_i16<8>(q, s, m, x, tokens, in, out, g, y)) return;
      gemv_quant<8>(q, s, m, x, tokens, in, out, g, y);
    }
  };
  if (scales.scalar_type() == at::kHalf)
    run(scales.data_ptr<at::Half>(), mins ? mins->data_ptr<at::Half>() : nullptr);
  else
    run(scales.data_ptr<float>(), mins ? mins->data_ptr<float>() : nullptr);
}

}  // namespace
