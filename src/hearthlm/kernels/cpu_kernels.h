// The CPU kernels' entry points, shared by the files that define them (gemv_cpu.cpp, quant_cpu.cpp), the fused
// decoder layer that chains them (decoder_cpu.cpp) and the Python bindings (bindings_cpu.cpp). Only the bindings
// include torch/extension.h, which triples a file's compile time; the kernels need torch/types.h alone.
#pragma once

#include <torch/types.h>

#include <string>
#include <type_traits>
#include <vector>

// A kernel pass holds at most kPassRows input rows in registers. On AVX2 wider inputs (a decode batch of up to
// cpu.MAX_DECODE_ROWS rows, in one fused forward) run as even slices of at most kPassRows rows, each weight tile
// meeting every slice while it is in cache: slice i of k is rows [i * M / k, (i + 1) * M / k), the cuts the engine
// used when it ran such a batch as separate forwards, and each slice runs the instructions of a call of its own, so
// each row's result is what it was then.
constexpr int64_t kPassRows = 8;
// On the AVX2 path the fused decode step gives quantized projections of more rows than this to the integer GEMM, as
// quant_linear does (kernels/cpu.py QUANT_GEMV_ROWS_AVX2, where the figures are).
constexpr int64_t kQuantGemvRowsAvx2 = 12;
// The cuts of M rows into even slices of at most `most`: slice i is rows [cuts[i], cuts[i + 1]).
std::vector<int64_t> even_cuts(int64_t M, int64_t most);
// kernel(std::integral_constant<int, M>{}) for a slice of M rows, 1 <= M <= kPassRows: runs a kernel whose row count
// is a template parameter. fn names the caller in the error for another M.
template <typename F>
void with_rows(int64_t M, const char* fn, F&& kernel) {
  switch (M) {
    case 1: return kernel(std::integral_constant<int, 1>{});
    case 2: return kernel(std::integral_constant<int, 2>{});
    case 3: return kernel(std::integral_constant<int, 3>{});
    case 4: return kernel(std::integral_constant<int, 4>{});
    case 5: return kernel(std::integral_constant<int, 5>{});
    case 6: return kernel(std::integral_constant<int, 6>{});
    case 7: return kernel(std::integral_constant<int, 7>{});
    case 8: return kernel(std::integral_constant<int, 8>{});
  }
  TORCH_CHECK(false, fn, ": a slice must have 1..8 rows, got ", M);
}

// Float weights (gemv_cpu.cpp). Shapes and dtypes are documented at each definition.
torch::Tensor gemv(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias);
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps);
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale);
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor K, torch::Tensor V, torch::Tensor slots,
                                     c10::optional<torch::Tensor> mask, double scale);
void kv_store(torch::Tensor K, torch::Tensor V, torch::Tensor slots, torch::Tensor k, torch::Tensor v);
torch::Tensor act_mul(torch::Tensor x, const std::string& act);

// Logits (logits_cpu.cpp).
torch::Tensor softcap_(torch::Tensor x, double cap);
torch::Tensor argmax_rows(torch::Tensor x);

// Quantized weights (quant_cpu.cpp).
torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t bits, int64_t group, c10::optional<torch::Tensor> bias);
torch::Tensor dequant_rows(torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins, int64_t bits,
                           int64_t group, torch::Tensor rows);
// x [..., K] @ W^T (+ bias) for a bfloat16 or float16 W [N, K] -> float32 [..., N], x and the sums in float32; for
// prefill on AVX2 (gemm_half_avx2.cpp).
torch::Tensor half_gemm_avx2(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias);
// The checks every quantized-weight kernel makes of W's parts (quant_cpu.cpp); returns K. fn names the kernel.
int64_t check_weight(const char* fn, const torch::Tensor& q, const torch::Tensor& scales,
                     const c10::optional<torch::Tensor>& mins, int64_t bits, int64_t group);
// quant_gemv's product for any number of rows as an integer GEMM on AVX2, for prefill (gemm_avx2.cpp).
torch::Tensor quant_gemm_avx2(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales,
                              c10::optional<torch::Tensor> mins, int64_t bits, int64_t group,
                              c10::optional<torch::Tensor> bias);
// Which instructions the GEMVs (gemv, quant_gemv, and so DecodeLinear) run on: "avx512" (AVX-512 F/BW/VL/DQ with
// VNNI, where the CPU has it) or "avx2", the default (gemv_cpu.cpp).
void set_gemv_isa(const std::string& isa);
std::string gemv_isa();
bool avx512_path();
