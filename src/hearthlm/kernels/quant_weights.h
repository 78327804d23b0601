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

// The high bits of a 5- or 6-bit block (h = 1 or 2; `high`: its 4 h high bytes) as 32 bytes, element e's in byte
// e at bits 4 and up, ready to OR onto the nibbles: one broadcast, one shift per 32-bit (h = 1) or 64-bit (h = 2)
// lane, one mask. Needs AVX2.
static inline __m256i high_bits(const uint8_t* high, int64_t h) {
  __m256i v;
  if (h == 1) {
    int32_t word;
    std::memcpy(&word, high, 4);
    v = _mm256_srlv_epi32(_mm256_set1_epi32(word), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  } else {
    int64_t word;
    std::memcpy(&word, high, 8);
    v = _mm256_srlv_epi64(_mm256_set1_epi64x(word), _mm256_setr_epi64x(0, 2, 4, 6));
  }
  return _mm256_slli_epi16(_mm256_and_si256(v, _mm256_set1_epi8(static_cast<char>((1 << h) - 1))), 4);
}

// The integers of weight row n, one signed byte each: 8-bit as stored; 4-bit q - shift (both halves of each
// 16-byte block: elements 0..15 in the low nibbles, 16..31 in the high ones); 5- and 6-bit q, less 2^(bits - 1)
// where the weight has no mins (its symmetric offset), with the high bits of element e at byte e % (4 h) of the
// block's 4 h high bytes, bits h (e / 4 h) up (h = bits - 4; quant/tensor.py). static: each extension, built with
// its own instruction set, keeps its own copy.
static inline void unpack_row(const QuantWeights& w, int64_t n, int8_t* out, int shift) {
  const uint8_t* src = w.q + n * w.row_bytes;
  if (w.bits == 8) {
    std::memcpy(out, src, w.K);
    return;
  }
  const int64_t block = 4 * w.bits, h = w.bits - 4;
  if (w.bits != 4) shift = w.mins ? 0 : 1 << (w.bits - 1);
  const __m128i low4 = _mm_set1_epi8(0x0f), by = _mm_set1_epi8(static_cast<char>(shift));
  for (int64_t b = 0; b < w.K / 32; ++b) {
    const uint8_t* blk = src + block * b;
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
    __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    if (h) {
      const __m256i top = high_bits(blk + 16, h);
      lo = _mm_or_si128(lo, _mm256_castsi256_si128(top));
      hi = _mm_or_si128(hi, _mm256_extracti128_si256(top, 1));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b), _mm_sub_epi8(lo, by));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b + 16), _mm_sub_epi8(hi, by));
  }
}

}  // namespace hearth
