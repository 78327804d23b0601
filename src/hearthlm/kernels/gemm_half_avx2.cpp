// Prefill products with 16-bit weights (bf16 or fp16, as GGUF F16 files and bf16 checkpoints hold them) on AVX2 +
// FMA + F16C, for CPUs without AVX512-BF16 or AMX. PyTorch's half-precision GEMMs emulate 16-bit there and run
// several times slower than float32, so prefill converted the whole weight to float32 on every call (a second,
// twice as large copy written to and read back from memory) and ran float32's GEMM. Here the weight is converted
// a panel at a time instead, into the thread's buffer, while it is packed for the micro-kernel:
// - Panels of 16 output columns, [K][16] float32: one 64-byte row is the 16 columns' next k. A panel (128 KB at
//   K = 2048) stays in L2 while every row of x passes over it.
// - The micro-kernel keeps a 6 x 16 block of y in 12 registers over all of K; per k it loads the panel's 2 vectors
//   and broadcasts each of the 6 rows' x, 12 FMAs: 15 of the 16 registers.
// x stays float32 and the sums are float32: the float32 path's numbers, up to the order of the sums.
#include "cpu_kernels.h"
#include "threadpool.h"
#include "transpose8.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

constexpr int kCols = 16;  // output columns per panel: two vectors of 8 floats
constexpr int kRows = 6;   // rows of x per register tile

// 8 consecutive 16-bit weights -> 8 floats.
template <bool BF16>
inline __m256 widen(const uint16_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
  return _mm256_cvtph_ps(v);
}

// Columns n0..n0+15 of W [N][K] (zero past N) -> panel [K][16] float32.
template <bool BF16>
void pack_panel(const uint16_t* W, int64_t N, int64_t K, int64_t n0, std::vector<float>& panel) {
  panel.resize(K * kCols);
  for (int h = 0; h < 2; ++h) {
    const int64_t first = n0 + 8 * h;
    for (int64_t k = 0; k < K; k += 8) {
      __m256i r[8];  // floats, as 32-bit words for the transpose
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_castps_si256(first + i < N ? widen<BF16>(W + (first + i) * K + k) : _mm256_setzero_ps());
      hearth::transpose8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(panel.data() + (k + j) * kCols + 8 * h, _mm256_castsi256_ps(r[j]));
    }
  }
}

// y[m0 : m0 + R, n0 : n0 + cols] (+ bias) from one packed panel.
template <int R>
void tile(const float* x, int64_t K, const float* panel, float* y, int64_t N, int64_t m0, int64_t n0, int64_t cols,
          const float* bias) {
  __m256 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_ps();
  const float* xr = x + m0 * K;
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kCols), w1 = _mm256_loadu_ps(panel + k * kCols + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 xb = _mm256_broadcast_ss(xr + r * K + k);
      lo[r] = _mm256_fmadd_ps(xb, w0, lo[r]);
      hi[r] = _mm256_fmadd_ps(xb, w1, hi[r]);
    }
  }
  // The sums leave their registers in one unrolled pass: indexed by a loop that is not unrolled, they would live
  // in memory, and GCC then stores every sum to the stack on each k (half the speed).
  alignas(32) float out[R][kCols];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out[r], lo[r]);
    _mm256_store_ps(out[r] + 8, hi[r]);
  }
  for (int r = 0; r < R; ++r) {
    float* dst = y + (m0 + r) * N + n0;
    for (int64_t j = 0; j < cols; ++j) dst[j] = out[r][j] + (bias ? bias[n0 + j] : 0.0f);
  }
}

// The last M % kRows rows: the tile of exactly that many.
template <int R>
void rest(const float* x, int64_t M, int64_t K, const float* panel, float* y, int64_t N, int64_t m0, int64_t n0,
          int64_t cols, const float* bias) {
  if constexpr (R > 0) {
    if (M - m0 == R)
      tile<R>(x, K, panel, y, N, m0, n0, cols, bias);
    else
      rest<R - 1>(x, M, K, panel, y, N, m0, n0, cols, bias);
  }
}

template <bool BF16>
void half_gemm(const float* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, const float* bias, float* y) {
  const int64_t panels = (N + kCols - 1) / kCols;
  hearth::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> panel;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * kCols, cols = std::min<int64_t>(kCols, N - n0);
      pack_panel<BF16>(W, N, K, n0, panel);
      int64_t m = 0;
      for (; m + kRows <= M; m += kRows) tile<kRows>(x, K, panel.data(), y, N, m, n0, cols, bias);
      rest<kRows - 1>(x, M, K, panel.data(), y, N, m, n0, cols, bias);
    }
  }, panels);
}

}  // namespace

torch::Tensor half_gemm_avx2(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous() && (W.scalar_type() == torch::kBFloat16 || W.scalar_type() == torch::kHalf),
              "half_gemm: W must be a contiguous 2-D bfloat16 or float16 tensor");
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.is_floating_point() && x.dim() >= 1 && x.size(-1) == K && K % 8 == 0,
              "half_gemm: x must be a float tensor [..., K] with K (", K, ") a multiple of 8");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "half_gemm: bias must be 1-D with N (", N, ") elements");
  const auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, N}, xf.options());
  c10::optional<torch::Tensor> b;
  if (bias) b = bias->to(torch::kFloat32).contiguous();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr());
  if (M > 0 && N > 0) {
    if (W.scalar_type() == torch::kBFloat16)
      half_gemm<true>(xf.data_ptr<float>(), M, K, w, N, bp, y.data_ptr<float>());
    else
      half_gemm<false>(xf.data_ptr<float>(), M, K, w, N, bp, y.data_ptr<float>());
  }
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}
