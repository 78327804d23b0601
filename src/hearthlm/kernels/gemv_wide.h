// The AVX-512 path of gemv for any number of x rows in one pass over the weights (gemv_wide.cpp), for gemv_cpu.cpp.
#pragma once

#include <torch/types.h>

#include <cstdint>

// y [M][N] = x [M][K] (float32, contiguous) . W^T for a contiguous W [N][K]. Call only where the CPU has AVX-512
// F/BW/VL/DQ.
void gemv_wide(const float* x, const float* W, float* y, int64_t M, int64_t K, int64_t N);
void gemv_wide(const float* x, const at::Half* W, float* y, int64_t M, int64_t K, int64_t N);
void gemv_wide(const float* x, const at::BFloat16* W, float* y, int64_t M, int64_t K, int64_t N);
