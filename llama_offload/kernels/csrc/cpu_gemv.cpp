// The CPU lane's per-matrix operators: y = x @ W^T for a few tokens over fp16/bf16 weights or int8/int4 codes
// (the products themselves are in gemv.h). Built at first use on the machine that runs it (native_build.py,
// -march=native): AVX-512 where the CPU has it, AVX2 + F16C otherwise, plain C++ beyond those.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "gemv.h"

namespace {

// x (tokens, in) in its dtype -> fp32, row-major. Converted here rather than by x.to(float): a decode step calls
// the kernels seven times a block, and each ATen conversion costs a dispatch and a tensor.
std::vector<float> tokens_fp32(const at::Tensor& x) {
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.numel();
  std::vector<float> out(n);
  if (xc.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), xc.data_ptr<float>(), n * sizeof(float));
  } else {
    const uint16_t* p = static_cast<const uint16_t*>(xc.data_ptr());
    const bool bf16 = xc.scalar_type() == at::kBFloat16;
    int64_t i = 0;
#ifndef LLAMA_OFFLOAD_SCALAR
    for (; i + kLanes <= n; i += kLanes) vstore(out.data() + i, bf16 ? load_bf16(p + i) : load_half(p + i));
#endif
    for (; i < n; ++i) out[i] = bf16 ? bf16_to_float(p[i]) : half_to_float(p[i]);
  }
  return out;
}

// An fp32 (..., out) result for x's leading dimensions: the kernels write it, then it takes x's dtype.
at::Tensor fp32_output(const at::Tensor& x, int64_t out) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  return at::empty(shape, x.options().dtype(at::kFloat));
}

void check_x(const at::Tensor& x, int64_t in, const char* what) {
  TORCH_CHECK(x.device().is_cpu(), "cpu_gemv.", what, ": x must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in, "cpu_gemv.", what, ": x's last dimension is ", x.size(-1),
              " but the weight has ", in, " input features");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "cpu_gemv.", what, ": x must be float16, bfloat16 or float32");
}

}  // namespace

// y (..., out) = x (..., in) @ w^T, w (out, in) float16 or bfloat16.
at::Tensor linear16(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "cpu_gemv.linear16: w must be a contiguous (out, in) CPU matrix");
  TORCH_CHECK(w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16, "cpu_gemv.linear16: w must be float16 or bfloat16");
  const int64_t out = w.size(0), in = w.size(1);
  check_x(x, in, "linear16");
  const int64_t tokens = x.numel() / in;
  std::vector<float> xf = tokens_fp32(x);
  at::Tensor y = fp32_output(x, out);
  const uint16_t* wp = static_cast<const uint16_t*>(w.data_ptr());
  if (w.scalar_type() == at::kBFloat16) gemv16<true>(wp, xf.data(), tokens, in, out, y.data_ptr<float>());
  else gemv16<false>(wp, xf.data(), tokens, in, out, y.data_ptr<float>());
  return y.to(x.scalar_type());
}

// y (..., out) = x (..., in) @ dequantize(w, scales, mins)^T: int8 (out, in) or int4 uint8 (out, in / 2). int16_x:
// a 16-bit x (fp16 or bf16) rounded to int16 per group for integer dot products (gemv_i16.h) where the shapes
// and the build allow; else (a fp32 model's x, or int16_x false) x in fp32.
at::Tensor linear_quant(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                        bool int16_x) {
  const bool int4 = w.scalar_type() == at::kByte;
  TORCH_CHECK(int4 || w.scalar_type() == at::kChar, "cpu_gemv.linear_quant: w must be int8 or uint8 (int4 pairs)");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "cpu_gemv.linear_quant: w must be a contiguous (out, in) CPU matrix");
  const int64_t out = w.size(0), in = int4 ? 2 * w.size(1) : w.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out && scales.is_contiguous() && in % scales.size(1) == 0,
              "cpu_gemv.linear_quant: scales must be a contiguous (out, groups) matrix whose groups divide the input");
  TORCH_CHECK(scales.scalar_type() == at::kHalf || scales.scalar_type() == at::kFloat, "cpu_gemv.linear_quant: scales must be float16 or float32");
  const bool has_mins = mins.has_value() && mins->defined();
  if (has_mins)
    TORCH_CHECK(mins->sizes() == scales.sizes() && mins->scalar_type() == scales.scalar_type() && mins->is_contiguous(),
                "cpu_gemv.linear_quant: mins must match scales");
  check_x(x, in, "linear_quant");
  TORCH_CHECK(!int4 || (in / scales.size(1)) % 2 == 0, "cpu_gemv.linear_quant: int4 groups must have an even size");
  const int64_t tokens = x.numel() / in;
  std::vector<float> xf = tokens_fp32(x);
  at::Tensor y = fp32_output(x, out);
  const bool i16 = int16_x && x.scalar_type() != at::kFloat;  // a fp32 model keeps fp32 activations
  quant_product(w, scales, has_mins ? &*mins : nullptr, xf.data(), tokens, i16, y.data_ptr<float>());
  return y.to(x.scalar_type());
}

TORCH_LIBRARY(llama_offload_cpu, m) {
  m.def("linear16(Tensor x, Tensor w) -> Tensor", &linear16);
  m.def("linear_quant(Tensor x, Tensor w, Tensor scales, Tensor? mins, bool int16_x=True) -> Tensor", &linear_quant);
  m.def("isa() -> str", &simd_isa);
}
