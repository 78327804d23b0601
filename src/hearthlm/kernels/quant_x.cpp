// x rounded to int8 per block of 32 for the quantized-weight GEMV paths (see quant_x.h).
#include "quant_x.h"

#include <immintrin.h>

#include <cmath>
#include <limits>

namespace {

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
  return _mm_cvtsi128_si32(s);
}

}  // namespace

// For 4-bit weights the AVX2 kernel's 32-byte load holds two blocks: its low nibbles are elements 0..15 of both,
// its high nibbles elements 16..31. Storing x's blocks paired lines them up with those two vectors, so one load
// feeds two blocks. A last odd block stays as it is.
void quantize_x(const float* x, int64_t M, int64_t K, bool paired, bool half_units, QuantizedX& qx) {
  qx.M = M;
  qx.K = K;
  qx.nb = K / 32;
  qx.nu = half_units ? 2 * qx.nb : qx.nb;
  qx.nu_pad = (qx.nu + 7) / 8 * 8;
  qx.q.resize(M * K);
  qx.d.assign(M * qx.nu_pad, 0.0f);
  qx.sum.assign(M * qx.nu_pad, 0.0f);
  qx.isum.assign(M * qx.nu_pad, 0);
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t m = 0; m < M; ++m) {
    int8_t* qrow = qx.q.data() + m * K;
    float* drow = qx.d.data() + m * qx.nu_pad;
    float* srow = qx.sum.data() + m * qx.nu_pad;
    int32_t* irow = qx.isum.data() + m * qx.nu_pad;
    for (int64_t b = 0; b < qx.nb; ++b) {
      const float* xb = x + m * K + b * 32;
      __m256 v[4];
      for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(xb + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
      const float amax = _mm_cvtss_f32(m4);
      __m256 nan = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) nan = _mm256_or_ps(nan, _mm256_cmp_ps(v[i], v[i], _CMP_UNORD_Q));
      // A NaN or infinity in x makes the block's scale NaN, so that it shows in the output (vmaxps would
      // drop a NaN from amax, and an infinite amax would round the rest of the block to zero).
      const bool finite = std::isfinite(amax) && !_mm256_movemask_ps(nan);
      const float d = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
      const __m256 id = _mm256_set1_ps(finite && d != 0.0f ? 1.0f / d : 0.0f);
      __m256i q[4];
      for (int i = 0; i < 4; ++i)
        q[i] = _mm256_cvtps_epi32(
            _mm256_round_ps(_mm256_mul_ps(v[i], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      const int32_t lo = hsum_epi32(_mm256_add_epi32(q[0], q[1])), hi = hsum_epi32(_mm256_add_epi32(q[2], q[3]));
      // int32 -> int8 keeping element order (the packs interleave 128-bit lanes; the permute undoes it).
      const __m256i p = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
      if (paired && !(b == qx.nb - 1 && (b & 1) == 0)) {
        int8_t* dst = qrow + (b & ~int64_t(1)) * 32 + (b & 1) * 16;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 32), _mm256_extracti128_si256(p, 1));
      } else {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qrow + b * 32), p);
      }
      if (half_units) {
        drow[2 * b] = drow[2 * b + 1] = d;
        srow[2 * b] = d * static_cast<float>(lo);
        srow[2 * b + 1] = d * static_cast<float>(hi);
        irow[2 * b] = lo;
        irow[2 * b + 1] = hi;
      } else {
        drow[b] = d;
        srow[b] = d * static_cast<float>(lo + hi);
        irow[b] = lo + hi;
      }
    }
  }
}

