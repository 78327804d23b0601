// The AVX-512 VNNI path of quant_gemv for 8-bit weights, any number of rows (quant_vnni.cpp), for quant_cpu.cpp.
#pragma once

#include <torch/types.h>

#include <cstdint>

#include "quant_x.h"

// y [M][N] = W . x^ for the M rows of qx (quantize_x, natural order, units of 16 when group is 16) and an 8-bit
// quantized W [N][K] in the QuantTensor layout: row_bytes per row, fp16 scales (and mins, or null) [N][K / group].
// Call only where the CPU has AVX-512 F/BW/VL/DQ and VNNI.
void quant_gemv_wide(const QuantizedX& qx, const uint8_t* q, int64_t row_bytes, const at::Half* scales,
                     const at::Half* mins, float* y, int64_t N, int64_t group);
