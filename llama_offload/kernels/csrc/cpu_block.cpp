// One transformer block's decode step on the host as one operator: Meta's block math (model.py's
// TransformerBlock.forward) for bs sequences of a few new tokens each, fp32 activations, the seven matrices as
// int8/int4 codes (quant.py's QuantLinear).
//
// A small model's decode step on a CPU is dominated by per-op costs, not by its weights: SmolLM2-135M's block
// ran about 45 torch ops and Python calls a token (RMSNorm, RoPE through complex views, two index_copy_ into the
// cache, slices, attention, residual adds, SiLU), 10 of its 25 ms a token on two cores against 15 ms of matrix
// products. Here they are loops over a few thousand floats between the products (gemv.h) and the attention
// (attention.h), with one scratch allocation per call.
//
//   n1 = rmsnorm(x) * attention_norm             q, k, v = wq n1, wk n1, wv n1      q, k = rope(q), rope(k)
//   cache[row_start[row0 + b] + pos[b, s]] = k, v                                     (KVCache.update's slots)
//   h = x + wo attend(q, cache up to each token's own position)
//   out = h + w2 (silu(w1 n2) * w3 n2),  n2 = rmsnorm(h) * ffn_norm

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention.h"
#include "gemv.h"

namespace {

enum { kWq, kWk, kWv, kWo, kW1, kW2, kW3, kMatrices };  // quant.LINEAR_NAMES' order

// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w for each of `tokens` rows of dim (F.rms_norm in fp32).
void rms_norm(const float* x, const float* w, float eps, int64_t tokens, int64_t dim, float* out) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = x + t * dim;
    float ss = 0.f;
    for (int64_t i = 0; i < dim; ++i) ss += xt[i] * xt[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = xt[i] * inv * w[i];
  }
}

// Meta's RoPE on (tokens, heads, head_dim): each pair (x[2i], x[2i+1]) times the complex freqs[t, i] =
// (cos, sin), freqs (tokens, head_dim / 2, 2).
void rope(float* x, const float* freqs, int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* f = freqs + t * half * 2;
    for (int64_t h = 0; h < heads; ++h) {
      float* p = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = p[2 * i], b = p[2 * i + 1], c = f[2 * i], d = f[2 * i + 1];
        p[2 * i] = a * c - b * d;
        p[2 * i + 1] = a * d + b * c;
      }
    }
  }
}

// A token's mask row in attention.h's terms: every cache position up to its own is visible (attention_mask).
struct Causal {
  int64_t pos;
  float operator[](int64_t t) const { return t <= pos ? 0.f : -std::numeric_limits<float>::infinity(); }
};

struct Matrix {
  const at::Tensor* codes;
  const at::Tensor* scales;
  const at::Tensor* mins;  // nullptr: none
  int64_t in, out;
};

}  // namespace

// Writes the block's output for x (bs, seqlen, dim) into out (the same shape; it may be x itself), and the
// step's keys and values into cache_k / cache_v (rows, positions, n_kv_heads, head_dim) at row_start[row0 + b] +
// input_pos[b, s]. freqs: (bs, seqlen, head_dim / 2, 2), torch.view_as_real of the per-token freqs_cis. Every
// token attends to the cache positions 0 .. its own of its row, within the first kv_len.
void block_decode(const at::Tensor& x, at::Tensor out, const at::Tensor& attention_norm, double attention_eps,
                  const at::Tensor& ffn_norm, double ffn_eps, at::TensorList codes, at::TensorList scales,
                  const c10::List<c10::optional<at::Tensor>>& mins, at::Tensor cache_k, at::Tensor cache_v,
                  const at::Tensor& row_start, int64_t row0, const at::Tensor& input_pos, const at::Tensor& freqs,
                  int64_t kv_len, int64_t n_heads) {
  // The last resort (cpu_block.py checks the operands before calling): a crash's worth of mistakes only.
  TORCH_CHECK(x.dim() == 3 && x.scalar_type() == at::kFloat && x.is_contiguous() && out.sizes() == x.sizes() &&
              out.scalar_type() == at::kFloat && out.is_contiguous(), "cpu_block.block_decode: x and out must be contiguous fp32 (bs, seqlen, dim)");
  TORCH_CHECK(codes.size() == kMatrices && scales.size() == kMatrices && mins.size() == kMatrices,
              "cpu_block.block_decode: seven matrices (wq, wk, wv, wo, w1, w2, w3)");
  TORCH_CHECK(cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes() && cache_k.scalar_type() == at::kFloat &&
              cache_v.scalar_type() == at::kFloat && cache_k.is_contiguous() && cache_v.is_contiguous(),
              "cpu_block.block_decode: the cache must be contiguous fp32 (rows, positions, n_kv_heads, head_dim)");
  const int64_t bs = x.size(0), seqlen = x.size(1), dim = x.size(2), tokens = bs * seqlen;
  const int64_t positions = cache_k.size(1), n_kv_heads = cache_k.size(2), head_dim = cache_k.size(3);
  const int64_t q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  TORCH_CHECK(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim % 2 == 0 && kv_len <= positions &&
              row0 >= 0 && row0 + bs <= cache_k.size(0), "cpu_block.block_decode: heads or rows do not fit the cache");
  TORCH_CHECK(input_pos.dim() == 2 && input_pos.size(0) == bs && input_pos.size(1) == seqlen &&
              input_pos.scalar_type() == at::kLong && row_start.scalar_type() == at::kLong,
              "cpu_block.block_decode: input_pos must be int64 (bs, seqlen)");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.numel() == tokens * head_dim,
              "cpu_block.block_decode: freqs must be fp32 (bs, seqlen, head_dim / 2, 2)");
  Matrix m[kMatrices];
  at::Tensor min_of[kMatrices];  // the list's optional mins, held here for Matrix's pointers
  for (int i = 0; i < kMatrices; ++i) {
    const at::Tensor& c = codes[i];
    const bool int4 = c.scalar_type() == at::kByte;
    TORCH_CHECK((int4 || c.scalar_type() == at::kChar) && c.dim() == 2 && c.is_contiguous() &&
                scales[i].dim() == 2 && scales[i].size(0) == c.size(0) && scales[i].is_contiguous() &&
                (scales[i].scalar_type() == at::kHalf || scales[i].scalar_type() == at::kFloat),
                "cpu_block.block_decode: matrix ", i, " is not int8/int4 codes with (out, groups) scales");
    const c10::optional<at::Tensor> mi = mins.get(i);
    if (mi.has_value() && mi->defined()) {
      min_of[i] = *mi;
      TORCH_CHECK(min_of[i].sizes() == scales[i].sizes() && min_of[i].scalar_type() == scales[i].scalar_type() &&
                  min_of[i].is_contiguous(), "cpu_block.block_decode: matrix ", i, "'s mins must match its scales");
    }
    m[i] = {&c, &scales[i], min_of[i].defined() ? &min_of[i] : nullptr,
            int4 ? 2 * c.size(1) : c.size(1), c.size(0)};
    TORCH_CHECK(m[i].in % scales[i].size(1) == 0 && (!int4 || (m[i].in / scales[i].size(1)) % 2 == 0),
                "cpu_block.block_decode: matrix ", i, "'s groups do not divide its inputs");
  }
  const int64_t hidden = m[kW1].out;
  TORCH_CHECK(m[kWq].in == dim && m[kWq].out == q_dim && m[kWk].in == dim && m[kWk].out == kv_dim &&
              m[kWv].in == dim && m[kWv].out == kv_dim && m[kWo].in == q_dim && m[kWo].out == dim &&
              m[kW1].in == dim && m[kW3].in == dim && m[kW3].out == hidden && m[kW2].in == hidden &&
              m[kW2].out == dim, "cpu_block.block_decode: the matrices' shapes do not make a block");
  // input_pos may be a broadcast view (make_step expands one start over the rows): read through its strides.
  const int64_t* pos = input_pos.data_ptr<int64_t>();
  const int64_t ps0 = input_pos.stride(0), ps1 = input_pos.stride(1);
  const int64_t* starts = row_start.data_ptr<int64_t>();
  for (int64_t b = 0; b < bs; ++b)
    for (int64_t s = 0; s < seqlen; ++s) {
      const int64_t p = pos[b * ps0 + s * ps1];
      TORCH_CHECK(p >= 0 && p < kv_len, "cpu_block.block_decode: a position lies outside the attended ", kv_len);
    }

  // One scratch for the step's activations: (tokens, dim) each for n, h and a matrix's output, q and the
  // attention (tokens, q_dim), k and v (tokens, kv_dim), gate and up (tokens, hidden).
  std::vector<float> scratch(tokens * (3 * dim + 2 * q_dim + 2 * kv_dim + 2 * hidden));
  float* n = scratch.data();
  float* h = n + tokens * dim;
  float* y = h + tokens * dim;
  float* q = y + tokens * dim;
  float* att = q + tokens * q_dim;
  float* k = att + tokens * q_dim;
  float* v = k + tokens * kv_dim;
  float* gate = v + tokens * kv_dim;
  float* up = gate + tokens * hidden;
  auto product = [&](int i, const float* in, float* result) {
    quant_product(*m[i].codes, *m[i].scales, m[i].mins, in, tokens, /*i16=*/false, result);
  };

  const float* xp = x.data_ptr<float>();
  rms_norm(xp, attention_norm.data_ptr<float>(), static_cast<float>(attention_eps), tokens, dim, n);
  product(kWq, n, q);
  product(kWk, n, k);
  product(kWv, n, v);
  const float* f = freqs.data_ptr<float>();
  rope(q, f, tokens, n_heads, head_dim);
  rope(k, f, tokens, n_kv_heads, head_dim);
  float* ck = cache_k.data_ptr<float>();
  float* cv = cache_v.data_ptr<float>();
  for (int64_t b = 0; b < bs; ++b)
    for (int64_t s = 0; s < seqlen; ++s) {
      const int64_t slot = starts[row0 + b] + pos[b * ps0 + s * ps1], t = b * seqlen + s;
      std::memcpy(ck + slot * kv_dim, k + t * kv_dim, kv_dim * sizeof(float));
      std::memcpy(cv + slot * kv_dim, v + t * kv_dim, kv_dim * sizeof(float));
    }
  // The rows' first kv_len positions, as KVCache.update returns them (k[row0 : row0 + bs, :kv_len]).
  const Cache c{ck + row0 * positions * kv_dim, cv + row0 * positions * kv_dim, positions * kv_dim, kv_dim, head_dim};
  const auto causal = [pos, ps0, ps1](int64_t b, int64_t s) { return Causal{pos[b * ps0 + s * ps1]}; };
  attend<float>(q, c, causal, bs, seqlen, n_heads, n_kv_heads, head_dim, kv_len, att);
  product(kWo, att, y);
  for (int64_t i = 0; i < tokens * dim; ++i) h[i] = xp[i] + y[i];
  rms_norm(h, ffn_norm.data_ptr<float>(), static_cast<float>(ffn_eps), tokens, dim, n);
  product(kW1, n, gate);
  product(kW3, n, up);
  for (int64_t i = 0; i < tokens * hidden; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  product(kW2, gate, y);
  float* o = out.data_ptr<float>();  // x is read for the last time above: out may be x
  for (int64_t i = 0; i < tokens * dim; ++i) o[i] = h[i] + y[i];
}

TORCH_LIBRARY(llama_offload_cpu_block, m) {
  m.def("block_decode(Tensor x, Tensor(a!) out, Tensor attention_norm, float attention_eps, Tensor ffn_norm, "
        "float ffn_eps, Tensor[] codes, Tensor[] scales, Tensor?[] mins, Tensor(b!) cache_k, Tensor(c!) cache_v, "
        "Tensor row_start, int row0, Tensor input_pos, Tensor freqs, int kv_len, int n_heads) -> ()",
        &block_decode);
  m.def("isa() -> str", &simd_isa);
}
