// The CPU lane's attention for a few new tokens against a block's KV cache in host memory.
//
// A decode step attends one query per head (a few, when drafts are verified) to kv_len cached keys: a few
// MB read once, a few million FMAs. torch's CPU attention is built for long queries: for one query over 256
// positions it took about 0.4 ms on one core, where reading the keys and values takes a few microseconds. Here
// every (sequence, head) pair is one task on torch's thread pool; its queries take their dot products with the
// cached keys in the cache's own layout (attention.h).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>

#include "attention.h"

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
  const float* mp = mf.data_ptr<float>();
  const auto m = [mp, seqlen, kv_len](int64_t b, int64_t s) { return mp + (b * seqlen + s) * kv_len; };
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
