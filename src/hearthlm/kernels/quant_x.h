// x rounded to int8 once per call for the quantized-weight GEMV paths (quant_cpu.cpp: AVX2; quant_vnni.cpp:
// AVX-512 VNNI): each row in blocks of 32 with one float scale per block (llama.cpp's Q8_0).
#pragma once

#include <cstdint>
#include <vector>

// A "unit" is what one weight scale covers at the finest: a block of 32 elements, or a half-block of 16 when
// the weights' group is 16. Per unit we keep the x scale of its block and the sum of x^ over it, as an integer
// and as a float (scale times the integer), padded with zeros to whole chunks of 8 units.
struct QuantizedX {
  int64_t M = 0, K = 0, nb = 0, nu = 0, nu_pad = 0;
  std::vector<int8_t> q;      // [M][K]; with `paired`, each pair of blocks is stored by halves (quantize_x)
  std::vector<float> d;       // [M][nu_pad] scale of the block holding the unit
  std::vector<float> sum;     // [M][nu_pad] scale times the sum of x^ over the unit
  std::vector<int32_t> isum;  // [M][nu_pad] the sum of x^ over the unit, in integers
};

// x float32 [M][K] (K a multiple of 32) -> qx. A block holding a NaN or an infinity gets a NaN scale, so that
// it shows in the output. paired: store blocks 2p, 2p+1 as [2p: 0..15][2p+1: 0..15][2p: 16..31][2p+1: 16..31]
// (the AVX2 4-bit kernel's order); half_units: units of 16 (group 16).
void quantize_x(const float* x, int64_t M, int64_t K, bool paired, bool half_units, QuantizedX& qx);
