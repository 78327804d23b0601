// What every float GEMV path shares (gemv_cpu.cpp, gemv_wide.cpp): loading 8 weights as float32, and the order
// in which one (weight row, x row) dot product is summed.
//
// The order: four 8-lane float32 sums a0..a3 take k in [32i, 32i + 8), [32i + 8, 32i + 16), ... for every whole
// block of 32; then (a0 + a1) + (a2 + a3) is summed across its lanes (hsum), and the last K % 32 products are
// added one by one. Each lane is a fused multiply-add chain in k order, so any kernel that keeps the same four sums
// (as 8- or 16-lane vectors) and ends with finish() gives the same bits.
#pragma once

#include <torch/types.h>
#include <immintrin.h>

#include <cstdint>

namespace hearth {

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The last K % 32 products, added one by one.
template <typename T>
inline float add_tail(float s, const T* w, const float* x, int64_t K32, int64_t K) {
  for (int64_t k = K32; k < K; ++k) s += static_cast<float>(w[k]) * x[k];
  return s;
}

// The dot product from its pair sums a01 = a0 + a1 and a23 = a2 + a3 (over k < K32 = K - K % 32) and the tail.
template <typename T>
inline float finish(__m256 a01, __m256 a23, const T* w, const float* x, int64_t K32, int64_t K) {
  return add_tail(hsum(_mm256_add_ps(a01, a23)), w, x, K32, K);
}

// hsum of v[0..8) at once, bit for bit: the same adds of the same pairs (halves, then lanes 2 apart, then
// neighbours), with eight sums' lanes interleaved by shuffles instead of reduced one vector at a time (a third of
// the instructions). out[i] = hsum(v[i]).
inline void hsum8(const __m256* v, float* out) {
  __m256 u[4];
  for (int i = 0; i < 4; ++i)  // [v2i's 4 half sums | v2i+1's]
    u[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                         _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  __m256 w[2];
  for (int i = 0; i < 2; ++i)  // lanes 0 + 2 and 1 + 3 of each
    w[i] = _mm256_add_ps(_mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(32) float lanes[8];  // v0, v2, v4, v6 | v1, v3, v5, v7
  _mm256_store_ps(lanes, r);
  for (int i = 0; i < 4; ++i) out[2 * i] = lanes[i], out[2 * i + 1] = lanes[4 + i];
}

}  // namespace hearth
