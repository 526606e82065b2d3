// Attention of a few new tokens against a block's KV cache in host memory, shared by the attention operator
// (cpu_attention.cpp) and the fused decode step of a block (cpu_block.cpp).
//
// Every (sequence, head) pair is one task on torch's thread pool; its queries take their dot products with the
// cached keys in the cache's own layout (no transposes, no repeated key/value heads for grouped queries), a
// softmax in fp32, and the weighted sum of the values. Positions the mask hides (-inf: beyond a sequence's
// length, inside the attended bucket) are skipped, not computed and zeroed.

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

#ifndef LLAMA_OFFLOAD_SCALAR
// kLanes cached values (fp16, bf16 or fp32) -> fp32.
template <typename T>
inline vec load_cached(const T* p) {
  if constexpr (std::is_same_v<T, float>) return vload(p);
  else if constexpr (std::is_same_v<T, at::Half>) return load_half(reinterpret_cast<const uint16_t*>(p));
  else return load_bf16(reinterpret_cast<const uint16_t*>(p));
}
#endif

// sum_i q[i] * k[i]: a query (fp32) against one cached key row; two accumulator chains (a head is only 4-8
// vectors long).
template <typename T>
inline float qk_dot(const float* q, const T* k, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifndef LLAMA_OFFLOAD_SCALAR
  vec s0 = vzero(), s1 = vzero();
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    s0 = vfma(vload(q + i), load_cached(k + i), s0);
    s1 = vfma(vload(q + i + kLanes), load_cached(k + i + kLanes), s1);
  }
  for (; i + kLanes <= n; i += kLanes) s0 = vfma(vload(q + i), load_cached(k + i), s0);
  s = vsum(s0) + vsum(s1);
#endif
  for (; i < n; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

// acc[i] += p * v[i], v one cached value row.
template <typename T>
inline void pv_axpy(float p, const T* v, float* acc, int64_t n) {
  int64_t i = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
  const vec pv = vset1(p);
  for (; i + kLanes <= n; i += kLanes) vstore(acc + i, vfma(pv, load_cached(v + i), vload(acc + i)));
#endif
  for (; i < n; ++i) acc[i] += p * static_cast<float>(v[i]);
}

struct Cache {
  const void* k;
  const void* v;
  int64_t row, pos, head;  // strides in elements: sequence, position, key/value head (head_dim is contiguous)
};

// out (bs, seqlen, n_heads, head_dim) fp32 = softmax(q k^T / sqrt(head_dim) + mask) v for every sequence and head.
// q: (bs, seqlen, n_heads, head_dim) fp32 contiguous; mask(b, s) -> M, where M(t) is the additive mask of token s
// of sequence b at cache position t: an additive tensor's row (cpu_attention.cpp) or a causal bound
// (cpu_block.cpp), so that the positions it hides (-inf) are skipped.
template <typename T, class Mask>
void attend(const float* q, const Cache& c, const Mask& mask, int64_t bs, int64_t seqlen, int64_t n_heads,
            int64_t n_kv_heads, int64_t head_dim, int64_t kv_len, float* out) {
  const int64_t n_rep = n_heads / n_kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  const float hidden = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, bs * n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kv_len), qs(head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_heads, h = task % n_heads, kvh = h / n_rep;
      const T* keys = static_cast<const T*>(c.k) + b * c.row + kvh * c.head;
      const T* values = static_cast<const T*>(c.v) + b * c.row + kvh * c.head;
      for (int64_t s = 0; s < seqlen; ++s) {
        const float* qi = q + ((b * seqlen + s) * n_heads + h) * head_dim;
        const auto mi = mask(b, s);
        for (int64_t i = 0; i < head_dim; ++i) qs[i] = qi[i] * scale;
        float top = hidden;
        for (int64_t t = 0; t < kv_len; ++t) {
          if (mi[t] == hidden) { scores[t] = hidden; continue; }
          scores[t] = qk_dot(qs.data(), keys + t * c.pos, head_dim) + mi[t];
          top = std::max(top, scores[t]);
        }
        float* o = out + ((b * seqlen + s) * n_heads + h) * head_dim;
        if (top == hidden) {  // every position hidden: NaN, as a softmax over nothing but -inf gives
          std::fill(o, o + head_dim, std::numeric_limits<float>::quiet_NaN());
          continue;
        }
        std::fill(o, o + head_dim, 0.f);
        float total = 0.f;
        for (int64_t t = 0; t < kv_len; ++t) {
          if (scores[t] == hidden) continue;
          const float p = std::exp(scores[t] - top);
          total += p;
          pv_axpy(p, values + t * c.pos, o, head_dim);
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < head_dim; ++i) o[i] *= inv;
      }
    }
  });
}

}  // namespace
