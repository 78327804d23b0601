// The AVX-512 extension's entry points (gemm_avx512.cpp), for its Python bindings (bindings_avx512.cpp).
#pragma once

#include <torch/types.h>

// x [..., K] (any float dtype) @ W^T (+ bias) for a quantized W [N, K] in the QuantTensor layout -> float32
// [..., N]; x is rounded to int8 per block of 32 inside, as the decode GEMV does. amx: on the AMX tile unit
// (needs amx_available()), else with AVX-512 VNNI.
torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t bits, int64_t group, c10::optional<torch::Tensor> bias, bool amx);

// Whether the AMX tile unit may be used here (the CPU has it and Linux granted this process its state).
bool amx_available();

// Whether the CPU has AVX512-BF16 (VDPBF16PS), which bf16_gemm needs when amx is false.
bool avx512_bf16_available();

// x [..., K] (any float dtype) @ W^T (+ bias) for a contiguous bfloat16 W [N, K] (K a multiple of 32) -> float32
// [..., N], with x carried as two bf16 halves (16 bits of it) and float32 sums: the float32 path's numbers. amx:
// on AMX-BF16 (needs amx_available()), else on AVX512-BF16 (needs avx512_bf16_available()).
torch::Tensor bf16_gemm(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias, bool amx);
