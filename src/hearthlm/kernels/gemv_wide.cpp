// The AVX-512 path of gemv for 2 or more x rows (a decode batch, a speculative verify step, a short prompt), in one
// pass over the weights.
//
// At one x row decode streams the weights from memory and the arithmetic hides behind it. At 16 rows there is 16
// times the arithmetic for the same memory, and on a CPU whose 512-bit FMAs run at the 256-bit rate (Zen 4) what
// counts is keeping the FMA units busy with few loads: the sums of 4 weight rows times 3 x rows stay in the 32
// vector registers, so each weight vector is converted to float32 once per 3 x rows and each x vector serves 4
// weight rows. A tile of 4 weight rows stays in L1/L2 while every block of x rows passes over it, so the weights are
// read from memory once whatever the number of x rows, and the next tile is prefetched evenly over those passes.
//
// Every (weight row, x row) pair keeps the four sums of gemv_row.h, as two 16-lane vectors, and ends with its
// finish(): the same bits as the one-row kernel (gemv_cpu.cpp), so a row's result does not depend on the rows
// beside it. The extension is compiled for AVX2; these functions carry the AVX-512 target themselves, and gemv
// calls them only on the "avx512" path (set_gemv_isa).
#include "gemv_wide.h"

#include "gemv_row.h"
#include "threadpool.h"

#include <algorithm>

#define HEARTH_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")))

namespace {

HEARTH_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
HEARTH_AVX512 inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
HEARTH_AVX512 inline __m512 load16(const at::BFloat16* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Prefetches the next tile's weights (contiguous: rows n + R .. n + 2R - 1) evenly over all the steps of K that
// the blocks of x rows make over this tile, so that memory and arithmetic overlap whatever the number of x rows.
struct Ahead {
  const char *at, *end;
  int64_t lines;  // cache lines per step of 32 elements of K
  HEARTH_AVX512 void step() {
    for (int64_t i = 0; i < lines && at < end; ++i, at += 64) _mm_prefetch(at, _MM_HINT_T0);
  }
};

// The 8-lane pair sum a0 + a1 of a 16-lane vector holding [a0 | a1].
HEARTH_AVX512 inline __m256 pair(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}

// y[m, n + r] for r < R and m in [m0, m0 + MB): the R * MB pairs' sums in registers over all of K.
template <typename T, int R, int MB>
HEARTH_AVX512 void block(const float* x, const T* W, float* y, int64_t K, int64_t N, int64_t n, int64_t m0,
                         Ahead& ahead) {
  const int64_t K32 = K - K % 32;
  __m512 acc[MB][R][2];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r][0] = acc[m][r][1] = _mm512_setzero_ps();
  const T* w = W + n * K;
  const float* xb = x + m0 * K;
  for (int64_t k = 0; k < K32; k += 32) {
    ahead.step();
    for (int h = 0; h < 2; ++h) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + k + 16 * h);
      for (int m = 0; m < MB; ++m) {
        const __m512 xv = _mm512_loadu_ps(xb + m * K + k + 16 * h);
        for (int r = 0; r < R; ++r) acc[m][r][h] = _mm512_fmadd_ps(wv[r], xv, acc[m][r][h]);
      }
    }
  }
  // Each pair's finish(), its horizontal sums eight pairs at a time (hsum8).
  constexpr int P = MB * R, P8 = (P + 7) / 8 * 8;
  __m256 t[P8];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) t[m * R + r] = _mm256_add_ps(pair(acc[m][r][0]), pair(acc[m][r][1]));
  for (int i = P; i < P8; ++i) t[i] = _mm256_setzero_ps();
  float s[P8];
  for (int i = 0; i < P8; i += 8) hearth::hsum8(t + i, s + i);
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      y[(m0 + m) * N + n + r] = hearth::add_tail(s[m * R + r], w + r * K, xb + m * K, K32, K);
}

// block<T, R, rows> for a run-time rows in [1, MB].
template <typename T, int R, int MB>
HEARTH_AVX512 void block_of(int64_t rows, const float* x, const T* W, float* y, int64_t K, int64_t N, int64_t n,
                            int64_t m0, Ahead& ahead) {
  if constexpr (MB > 1)
    if (rows < MB) return block_of<T, R, MB - 1>(rows, x, W, y, K, N, n, m0, ahead);
  block<T, R, MB>(x, W, y, K, N, n, m0, ahead);
}

// All M x rows against weight rows [n, n + R), in even blocks of at most MB x rows (7 rows in threes: 3 + 2 + 2, not
// 3 + 3 + 1, whose one-row block would load R weight vectors per x vector).
template <typename T, int R, int MB>
HEARTH_AVX512 void blocks(const float* x, const T* W, float* y, int64_t M, int64_t K, int64_t N, int64_t n) {
  const int64_t count = (M + MB - 1) / MB;
  const char* next = reinterpret_cast<const char*>(W + (n + R) * K);
  const int64_t bytes = std::min<int64_t>(R, std::max<int64_t>(N - n - R, 0)) * K * sizeof(T);
  Ahead ahead{next, next + bytes, (bytes / 64 + count * (K / 32) - 1) / std::max<int64_t>(count * (K / 32), 1)};
  for (int64_t b = 0; b < count; ++b) {
    const int64_t m0 = b * M / count;
    block_of<T, R, MB>((b + 1) * M / count - m0, x, W, y, K, N, n, m0, ahead);
  }
}

// 4 weight rows x 3 x rows: 24 sums (two 16-lane vectors a pair) + 4 weight vectors + 1 x vector in 32 registers.
// Of the shapes that fit, this one loads the fewest vectors per FMA (7 per 12), and measured the fastest from cache
// (benchmarks/gemv_paths.py): about 90 of this Zen 4's ~96 GMAC/s float32 peak on 2 cores at 16 rows.
constexpr int kTileRows = 4;
constexpr int kBlockRows = 3;

template <typename T>
HEARTH_AVX512 void run(const float* x, const T* W, float* y, int64_t M, int64_t K, int64_t N) {
  // Pieces of at least 64 KB of weights: each task's setup is small next to that.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (kTileRows * K * static_cast<int64_t>(sizeof(T))));
  hearth::parallel_for(0, N / kTileRows, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) blocks<T, kTileRows, kBlockRows>(x, W, y, M, K, N, t * kTileRows);
  });
  for (int64_t n = N - N % kTileRows; n < N; ++n) blocks<T, 1, kBlockRows>(x, W, y, M, K, N, n);
}

}  // namespace

void gemv_wide(const float* x, const float* W, float* y, int64_t M, int64_t K, int64_t N) { run(x, W, y, M, K, N); }
void gemv_wide(const float* x, const at::Half* W, float* y, int64_t M, int64_t K, int64_t N) { run(x, W, y, M, K, N); }
void gemv_wide(const float* x, const at::BFloat16* W, float* y, int64_t M, int64_t K, int64_t N) {
  run(x, W, y, M, K, N);
}
