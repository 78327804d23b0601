// One 2-D quantized weight (the QuantTensor layout of quant/tensor.py) as the integer GEMMs read it while packing
// their panels (gemm_avx2.cpp, gemm_avx512.cpp).
#pragma once

#include <torch/types.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace hearth {

struct QuantWeights {
  const uint8_t* q;  // [N][row_bytes]
  int64_t N, K, row_bytes;
  const at::Half* scales;  // [N][ng]
  const at::Half* mins;    // [N][ng] or null
  int64_t ng, group, bits;
};

// The integers of weight row n, one signed byte each: 8-bit as stored, 4-bit q - shift (both halves of each
// 16-byte block: elements 0..15 in the low nibbles, 16..31 in the high ones). static: each extension, built with
// its own instruction set, keeps its own copy.
static inline void unpack_row(const QuantWeights& w, int64_t n, int8_t* out, int shift) {
  const uint8_t* src = w.q + n * w.row_bytes;
  if (w.bits == 8) {
    std::memcpy(out, src, w.K);
    return;
  }
  const __m128i low4 = _mm_set1_epi8(0x0f), by = _mm_set1_epi8(static_cast<char>(shift));
  for (int64_t b = 0; b < w.K / 32; ++b) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b), _mm_sub_epi8(_mm_and_si128(v, low4), by));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b + 16),
                     _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), by));
  }
}

}  // namespace hearth
