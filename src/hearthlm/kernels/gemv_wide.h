// The AVX-512 path of gemv for any number of x rows in one pass over the weights (gemv_wide.cpp), for gemv_cpu.cpp.
#pragma once

#include <torch/types.h>

#include <cstdint>

// y [M][N] = x [M][K] (float32, contiguous) . W^T for a contiguous float32/fp16/bf16 W [N][K]. Call only where the
// CPU has AVX-512 F/BW/VL/DQ.
void gemv_wide(const float* x, const torch::Tensor& W, float* y, int64_t M);
