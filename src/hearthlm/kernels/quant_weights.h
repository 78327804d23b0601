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

// 5- and 6-bit weights (quant/tensor.py): a row's nibbles as for 4-bit, then its plane of h = bits - 4 high bits.
// These return high bits shifted to bit 4 of each byte, ready to OR onto the nibbles. Need AVX2.

inline __m256i lanes64(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  return _mm256_setr_epi64x(static_cast<long long>(a), static_cast<long long>(b), static_cast<long long>(c),
                            static_cast<long long>(d));
}

// A pair of blocks (8 h bytes at `high`): for the two vectors one 32-byte load of the pair's nibbles gives, lo
// (elements 0..15 of both blocks) and hi (16..31 of both). One broadcast, then a mask and a shift per 64-bit lane
// for each vector.
static inline void pair_high_bits(const uint8_t* high, int64_t h, __m256i& lo, __m256i& hi) {
  if (h == 2) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(high)));
    lo = _mm256_sllv_epi64(_mm256_and_si256(v, lanes64(0x0303030303030303, 0x0303030303030303, 0x0C0C0C0C0C0C0C0C,
                                                       0x0C0C0C0C0C0C0C0C)),
                           _mm256_setr_epi64x(4, 4, 2, 2));
    hi = _mm256_srlv_epi64(_mm256_and_si256(v, lanes64(0x3030303030303030, 0x3030303030303030, 0xC0C0C0C0C0C0C0C0,
                                                       0xC0C0C0C0C0C0C0C0)),
                           _mm256_setr_epi64x(0, 0, 2, 2));
  } else {
    int64_t word;
    std::memcpy(&word, high, 8);
    const __m256i v = _mm256_set1_epi64x(word);
    lo = _mm256_sllv_epi64(_mm256_and_si256(v, lanes64(0x0101010101010101, 0x0202020202020202, 0x0404040404040404,
                                                       0x0808080808080808)),
                           _mm256_setr_epi64x(4, 3, 2, 1));
    hi = _mm256_srlv_epi64(_mm256_and_si256(v, lanes64(0x1010101010101010, 0x2020202020202020, 0x4040404040404040,
                                                       0x8080808080808080)),
                           _mm256_setr_epi64x(0, 1, 2, 3));
  }
}

// An unpaired last block (4 h bytes at `high`), elements 0..31 in order: element e's bits at byte e % 4h, h (e / 4h)
// up. One broadcast, one shift per 32-bit (h = 1) or 64-bit (h = 2) lane, one mask.
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

// Block b of a 4-, 5- or 6-bit weight row of K elements, as integers 0..2^bits - 1: elements 0..15 in `first`,
// 16..31 in `second`.
static inline void block_ints(const uint8_t* row, int64_t K, int64_t b, int64_t bits, __m128i& first, __m128i& second) {
  const __m128i low4 = _mm_set1_epi8(0x0f);
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b));
  first = _mm_and_si128(v, low4);
  second = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
  if (bits == 4) return;
  const int64_t h = bits - 4, nb = K / 32;
  const uint8_t* high = row + K / 2 + 8 * h * (b / 2);
  if (b / 2 < nb / 2) {
    __m256i lo, hi;
    pair_high_bits(high, h, lo, hi);
    first = _mm_or_si128(first, (b & 1) ? _mm256_extracti128_si256(lo, 1) : _mm256_castsi256_si128(lo));
    second = _mm_or_si128(second, (b & 1) ? _mm256_extracti128_si256(hi, 1) : _mm256_castsi256_si128(hi));
  } else {
    const __m256i t = high_bits(high, h);
    first = _mm_or_si128(first, _mm256_castsi256_si128(t));
    second = _mm_or_si128(second, _mm256_extracti128_si256(t, 1));
  }
}

// The integers of weight row n, one signed byte each: 8-bit as stored; 4-bit q - shift; 5- and 6-bit q, less
// 2^(bits - 1) where the weight has no mins (its symmetric offset). static: each extension, built with its own
// instruction set, keeps its own copy.
static inline void unpack_row(const QuantWeights& w, int64_t n, int8_t* out, int shift) {
  const uint8_t* src = w.q + n * w.row_bytes;
  if (w.bits == 8) {
    std::memcpy(out, src, w.K);
    return;
  }
  if (w.bits != 4) shift = w.mins ? 0 : 1 << (w.bits - 1);
  const __m128i by = _mm_set1_epi8(static_cast<char>(shift));
  for (int64_t b = 0; b < w.K / 32; ++b) {
    __m128i first, second;
    block_ints(src, w.K, b, w.bits, first, second);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b), _mm_sub_epi8(first, by));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 32 * b + 16), _mm_sub_epi8(second, by));
  }
}

}  // namespace hearth
