// The CPU lane's attention for a few new tokens against a block's KV cache in host memory.
//
// A decode step attends one query per head (a few, when drafts are verified) to kv_len cached keys: a few
// MB read once, a few million FMAs. torch's CPU attention is built for long queries: for one query over 256
// positions it took about 0.4 ms on one core, where reading the keys and values takes a few microseconds. Here
// every (sequence, head) pair is one task on torch's thread pool; its queries take their dot products with the
// cached keys in the cache's own layout (no transposes, no repeated key/value heads for grouped queries), a
// softmax in fp32, and the weighted sum of the values. Positions the additive mask hides (-inf: beyond a
// sequence's length, inside the attended bucket) are skipped, not computed and zeroed.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

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
inline float dot(const float* q, const T* k, int64_t n) {
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
inline void axpy(float p, const T* v, float* acc, int64_t n) {
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
// q: (bs, seqlen, n_heads, head_dim) fp32 contiguous; mask: (bs, seqlen, kv_len) fp32 contiguous.
template <typename T>
void attend(const float* q, const Cache& c, const float* mask, int64_t bs, int64_t seqlen, int64_t n_heads,
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
        const float* mi = mask + (b * seqlen + s) * kv_len;
        for (int64_t i = 0; i < head_dim; ++i) qs[i] = qi[i] * scale;
        float top = hidden;
        for (int64_t t = 0; t < kv_len; ++t) {
          if (mi[t] == hidden) { scores[t] = hidden; continue; }
          scores[t] = dot(qs.data(), keys + t * c.pos, head_dim) + mi[t];
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
          axpy(p, values + t * c.pos, o, head_dim);
        }
        const float inv = 1.f / total;
        for (int64_t i = 0; i < head_dim; ++i) o[i] *= inv;
      }
    }
  });
}

}  // namespace

// (bs, seqlen, n_heads * head_dim) in xq's dtype. xq: (bs, seqlen, n_heads, head_dim); keys, values:
// (bs, kv_len, n_kv_heads, head_dim) in any row/position/head strides with head_dim contiguous, as a KV cache's
// slice is; mask: additive, broadcastable to (bs, 1, seqlen, kv_len).
at::Tensor attend_cached(const at::Tensor& xq, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& mask) {
  TORCH_CHECK(xq.dim() == 4 && keys.dim() == 4 && values.dim() == 4, "cpu_attention.attend: xq, keys and values must be 4-d");
  TORCH_CHECK(xq.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu() && mask.device().is_cpu(),
              "cpu_attention.attend: every tensor must be on the CPU");
  const int64_t bs = xq.size(0), seqlen = xq.size(1), n_heads = xq.size(2), head_dim = xq.size(3);
  const int64_t kv_len = keys.size(1), n_kv_heads = keys.size(2);
  TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == bs && keys.size(3) == head_dim,
              "cpu_attention.attend: keys and values must be (bs, kv_len, n_kv_heads, head_dim) like xq");
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0, "cpu_attention.attend: n_heads must be a multiple of n_kv_heads");
  TORCH_CHECK(keys.scalar_type() == values.scalar_type() && keys.stride(3) == 1 && values.stride(3) == 1 &&
              keys.strides() == values.strides(), "cpu_attention.attend: keys and values must share one layout, head_dim contiguous");
  const auto kind = keys.scalar_type();
  TORCH_CHECK(kind == at::kHalf || kind == at::kBFloat16 || kind == at::kFloat,
              "cpu_attention.attend: the cache must be float16, bfloat16 or float32");
  at::Tensor qf = xq.to(at::kFloat).contiguous();
  at::Tensor mf = mask.to(at::kFloat).expand({bs, 1, seqlen, kv_len}).contiguous();
  at::Tensor out = at::empty({bs, seqlen, n_heads * head_dim}, xq.options().dtype(at::kFloat));
  const Cache c{keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2)};
  const float* q = qf.data_ptr<float>();
  const float* m = mf.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (kind == at::kHalf) attend<at::Half>(q, c, m, bs, seqlen, n_heads, n_kv_heads, head_dim, kv_len, o);
  else if (kind == at::kBFloat16) attend<at::BFloat16>(q, c, m, bs, seqlen, n_heads, n_kv_heads, head_dim, kv_len, o);
  else attend<float>(q, c, m, bs, seqlen, n_heads, n_kv_heads, head_dim, kv_len, o);
  return out.to(xq.scalar_type());
}

TORCH_LIBRARY(llama_offload_cpu_attention, m) {
  m.def("attend(Tensor xq, Tensor keys, Tensor values, Tensor mask) -> Tensor", &attend_cached);
  m.def("isa() -> str", &simd_isa);
}
