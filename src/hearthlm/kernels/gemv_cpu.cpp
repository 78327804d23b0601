// Matrix-vector products for a few input rows (decode batches, verify steps) on x86 CPUs with AVX2 + FMA + F16C.
//
// Decode is bound by how fast weights stream from memory. PyTorch's stock kernels reach only about
// half of the machine's read bandwidth at M = 1 (and much less for bf16 without AVX-512), so this
// kernel reads each weight row once, converts fp16/bf16 to fp32 in registers, and accumulates for up to 8
// input rows at once; more rows pass over a tile of weights in blocks while it is in cache. Rows of W are split
// across threads by hearthlm's pool (threadpool.h).
#include "cpu_kernels.h"
#include "gemv_row.h"
#include "gemv_wide.h"
#include "threadpool.h"

#include <torch/types.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using hearth::hsum;
using hearth::load8;

// f(T* tag) for the tensor's element type: float32, float16 or bfloat16 (weights, or a KV cache).
template <typename F>
void by_float_dtype(const torch::Tensor& k, const char* what, F f) {
  switch (k.scalar_type()) {
    case torch::kFloat32: return f(static_cast<float*>(nullptr));
    case torch::kFloat16: return f(static_cast<at::Half*>(nullptr));
    case torch::kBFloat16: return f(static_cast<at::BFloat16*>(nullptr));
    default: TORCH_CHECK(false, what, ": unsupported dtype ", k.scalar_type());
  }
}

// y[m, n] for n in [n0, n1) (at most kTileRows weight rows), R weight rows at a time (R * M sums in registers).
// When the M x rows pass kFitBytes, K goes in chunks of kChunk: a chunk of the x rows (16 KB at M = 8) stays in L1
// while every weight row of the tile passes over it, and the sums wait in `saved` between chunks. Over the whole of
// K, the 8 x rows of a K = 4864 projection came from L2 for every weight row: 37 GFLOP/s on a Zen 3, 49-55 in
// chunks (docs/cpu-kernels.md). Shorter rows stay whole: there the chunks' scattered weight reads cost more than
// they save. Each sum is the same fused multiply-add chain in k order either way, so chunks change no bits.
constexpr int64_t kTileRows = 16, kChunk = 512, kFitBytes = 28 << 10;
constexpr int64_t kAhead = 3;  // prefetch distance, in groups of R weight rows

template <typename T, int M, int R>
void rows_kernel(const float* x, const T* W, float* y, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  const int64_t K8 = K - K % 8, whole = n0 + (n1 - n0) / R * R;  // rows [whole, n1) go one at a time, below
  const int64_t chunk = M * K * static_cast<int64_t>(sizeof(float)) <= kFitBytes ? std::max<int64_t>(K8, 8) : kChunk;
  __m256 saved[kTileRows][M];
  for (int64_t k0 = 0; k0 < K8; k0 += chunk) {
    const int64_t k1 = std::min(K8, k0 + chunk);
    for (int64_t n = n0; n < whole; n += R) {
      __m256 acc[M][R];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) acc[m][r] = k0 == 0 ? _mm256_setzero_ps() : saved[n - n0 + r][m];
      // Prefetch the weights kAhead groups of R rows later in this order (chunk by chunk, row by row), one cache
      // line per row every 32 elements: the hardware prefetcher alone restarts on every short run of a row.
      const int64_t groups = (whole - n0) / R, at = (k0 / chunk) * groups + (n - n0) / R + kAhead;
      const T* next = W + (n0 + at % groups * R) * K + (at / groups - k0 / chunk) * chunk;
      for (int64_t k = k0; k < k1; k += 8) {
        if ((k & 31) == 0)
          for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(next + r * K + k), _MM_HINT_T0);
        __m256 w[R];
        for (int r = 0; r < R; ++r) w[r] = load8(W + (n + r) * K + k);
        for (int m = 0; m < M; ++m) {
          const __m256 xv = _mm256_loadu_ps(x + m * K + k);
          for (int r = 0; r < R; ++r) acc[m][r] = _mm256_fmadd_ps(w[r], xv, acc[m][r]);
        }
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) saved[n - n0 + r][m] = acc[m][r];
    }
  }
  for (int64_t n = n0; n < whole; ++n)
    for (int m = 0; m < M; ++m) {
      float s = K8 > 0 ? hsum(saved[n - n0][m]) : 0.0f;
      for (int64_t k = K8; k < K; ++k) s += static_cast<float>(W[n * K + k]) * x[m * K + k];
      y[m * N + n] = s;
    }
  if (whole < n1) rows_kernel<T, M, 1>(x, W, y, K, N, whole, n1);
}


// M = 1: one row at a time, front to back, with 4 accumulators. The weights are then read as one
// sequential stream per thread, which the prefetchers follow best (measured +11% GB/s over blocks of
// rows at Qwen2.5-0.5B shapes). Software prefetch 1 KB ahead runs into the next row, which is contiguous.
template <typename T>
void single_row_kernel(const float* x, const T* W, float* y, int64_t K, int64_t n0, int64_t n1) {
  constexpr int64_t ahead = 1024 / sizeof(T);
  const int64_t K32 = K - K % 32;
  for (int64_t n = n0; n < n1; ++n) {
    const T* w = W + n * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < K32; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w + k + ahead), _MM_HINT_T0);
      a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    y[n] = hearth::finish(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3), w, x, K32, K);
  }
}

// Weight rows [n0, n1) against one block of `rows` x rows (x and y at the block's first row): R * rows sums and R
// weight vectors in 16 registers.
template <typename T>
void block_rows(const float* x, const T* W, float* y, int64_t rows, int64_t K, int64_t N, int64_t n0, int64_t n1) {
  with_rows(rows, "gemv", [&](auto m) {
    constexpr int M = decltype(m)::value, R = M <= 2 ? 4 : (M <= 4 ? 2 : 1);
    if constexpr (M == 1)
      single_row_kernel<T>(x, W, y, K, n0, n1);
    else
      rows_kernel<T, M, R>(x, W, y, K, N, n0, n1);
  });
}

// Any number of x rows in one pass over the weights: a tile of 16 weight rows stays in L1/L2 while every block of
// x rows (even_cuts: at most kPassRows each) passes over it. Each block's sums are what a separate call on that
// block gives, so a row's result is the same as when more than kPassRows rows ran as separate slices.
template <typename T>
void run_rows(const float* x, const T* W, float* y, int64_t M, int64_t K, int64_t N) {
  const auto cuts = even_cuts(M, kPassRows);
  const int64_t tile = kTileRows;
  // At least 8 tiles' worth of work per thread task keeps overhead low.
  hearth::parallel_for(0, (N + tile - 1) / tile, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t n0 = t0 * tile; n0 < std::min(N, t1 * tile); n0 += tile)
      for (size_t b = 0; b + 1 < cuts.size(); ++b)
        block_rows(x + cuts[b] * K, W, y + cuts[b] * N, cuts[b + 1] - cuts[b], K, N, n0, std::min(N, n0 + tile));
  });
}

}  // namespace

std::vector<int64_t> even_cuts(int64_t M, int64_t most) {
  const int64_t k = (M + most - 1) / most;
  std::vector<int64_t> cuts(k + 1);  // (no rows: no slices)
  for (int64_t i = 1; i <= k; ++i) cuts[i] = i * M / k;
  return cuts;
}

namespace {

// Which path the GEMVs take: set from Python at load (kernels/cpu.py, after HEARTHLM_ISA), AVX2 until then.
std::atomic<bool> use_avx512{false};

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

}  // namespace

void set_gemv_isa(const std::string& isa) {
  TORCH_CHECK(isa == "avx512" || isa == "avx2", "set_gemv_isa: \"avx512\" or \"avx2\", got \"", isa, "\"");
  TORCH_CHECK(isa == "avx2" || cpu_has_avx512(), "set_gemv_isa: this CPU lacks AVX-512 F/BW/VL/DQ + VNNI");
  use_avx512 = isa == "avx512";
}

std::string gemv_isa() { return avx512_path() ? "avx512" : "avx2"; }

bool avx512_path() { return use_avx512.load(std::memory_order_relaxed); }

// x [..., K] (any float dtype), W [N, K] contiguous (fp32 / fp16 / bf16), bias float32 [N] or None -> x @ W^T + bias,
// float32 [..., N]; the reshape and conversions here, not as separate Python calls. On the AVX-512 path two or more
// rows run in one pass over the weights (gemv_wide.cpp), with the one-row kernel's bits; on AVX2 too (run_rows), in
// blocks of at most 8 rows with the bits of separate slices (cpu_kernels.h).
torch::Tensor gemv(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous(), "gemv: W must be a contiguous 2-D tensor");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == W.size(1), "gemv: x must be [..., K] with K = W.size(1)");
  const int64_t K = W.size(1), N = W.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous()),
              "gemv: bias must be float32 [", N, "]");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  by_float_dtype(W, "gemv", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (M > 1 && avx512_path())
      gemv_wide(xp, W.data_ptr<T>(), yp, M, K, N);
    else
      run_rows(xp, W.data_ptr<T>(), yp, M, K, N);
  });
  if (bias.has_value()) y.add_(*bias);
  return y.view(out_shape);
}

namespace {

// The sum of squares of a[0..D) in float64: each square is exact there, and four 4-lane sums take 16 elements
// at a time (the old one-element loop waited on each add: ~4 cycles an element).
double sum_squares(const float* a, int64_t D) {
  __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m256 lo = _mm256_loadu_ps(a + i), hi = _mm256_loadu_ps(a + i + 8);
    const __m256d d[4] = {_mm256_cvtps_pd(_mm256_castps256_ps128(lo)), _mm256_cvtps_pd(_mm256_extractf128_ps(lo, 1)),
                          _mm256_cvtps_pd(_mm256_castps256_ps128(hi)), _mm256_cvtps_pd(_mm256_extractf128_ps(hi, 1))};
    for (int j = 0; j < 4; ++j) s[j] = _mm256_fmadd_pd(d[j], d[j], s[j]);
  }
  const __m256d t = _mm256_add_pd(_mm256_add_pd(s[0], s[1]), _mm256_add_pd(s[2], s[3]));
  const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
  double ss = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
  for (; i < D; ++i) ss += static_cast<double>(a[i]) * a[i];
  return ss;
}

}  // namespace

// RMSNorm over the last dim of a float32 tensor, optionally times a float32 weight. Decode runs ~50 of these per
// token on vectors of a few hundred to a few thousand floats, where PyTorch's op costs ~10-40 us; this costs ~1. A
// prefill's rows are split over the pool. Each row's result depends on that row alone.
torch::Tensor rms_norm(torch::Tensor x, c10::optional<torch::Tensor> weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "rms_norm: x must be float32");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t D = xc.size(-1), rows = D ? xc.numel() / D : 0;
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto norm = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = xp + r * D;
      const float inv = static_cast<float>(1.0 / std::sqrt(sum_squares(a, D) / D + eps));
      float* b = yp + r * D;
      for (int64_t i = 0; i < D; ++i) b[i] = w ? a[i] * inv * w[i] : a[i] * inv;
    }
  };
  hearth::parallel_for(0, rows, std::max<int64_t>(1, (32 << 10) / std::max<int64_t>(D, 1)), norm);
  return y;
}

// Rotate-half RoPE: x [B, T, H, D] float32, cos/sin [B, T, 1, D] float32 -> new [B, T, H, D].
torch::Tensor rope(torch::Tensor x, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32, "rope: float32 only");
  auto xc = x.contiguous();
  auto c = cos.contiguous(), s = sin.contiguous();
  const int64_t B = xc.size(0), T = xc.size(1), H = xc.size(2), D = xc.size(3), half = D / 2;
  TORCH_CHECK(c.numel() == B * T * D, "rope: cos must be [B, T, 1, D]");
  auto y = torch::empty_like(xc);
  const float *xp = xc.data_ptr<float>(), *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  for (int64_t bt = 0; bt < B * T; ++bt) {
    const float *cr = cp + bt * D, *sr = sp + bt * D;
    for (int64_t h = 0; h < H; ++h) {
      const float* a = xp + (bt * H + h) * D;
      float* o = yp + (bt * H + h) * D;
      for (int64_t i = 0; i < half; ++i) {
        o[i] = a[i] * cr[i] - a[i + half] * sr[i];
        o[i + half] = a[i + half] * cr[i + half] + a[i] * sr[i + half];
      }
    }
  }
  return y;
}

namespace {

// SLEEF's 8-wide exp and tanh (1-ulp), which PyTorch's own silu and gelu use on AVX2 and libtorch_cpu exports.
// Weak: were a build of PyTorch without them loaded, act_mul and the attention softmax fall back to
// the scalar functions.
extern "C" __m256 Sleef_expf8_u10avx2(__m256) __attribute__((weak));
extern "C" __m256 Sleef_tanhf8_u10avx2(__m256) __attribute__((weak));

// The attention scores of NK keys (ks): each key's dot product with q is one 8-lane fused multiply-add chain over
// D, summed across its lanes, then the D % 8 tail one product at a time. NK chains side by side overlap in the FMA
// pipes where one chain waits on each add; a key gets the same bits whatever NK.
template <int NK, typename T>
inline void key_scores(const float* q, const T* const* ks, int64_t D, float scale, float* p) {
  __m256 acc[NK];
  for (auto& a : acc) a = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    for (int j = 0; j < NK; ++j) acc[j] = _mm256_fmadd_ps(qv, load8(ks[j] + i), acc[j]);
  }
  for (int j = 0; j < NK; ++j) {
    float sum = hsum(acc[j]);
    for (int64_t t = i; t < D; ++t) sum += q[t] * static_cast<float>(ks[j][t]);
    p[j] = sum * scale;
  }
}

// One head's attention scores p[s] = (q . k_s) * scale, four keys at a time, then the rest one by one. Keys the
// mask hides get -inf.
template <typename T, typename At>
void head_scores(const float* q, const T* k, const bool* mask, int64_t b, int64_t kv, int64_t S, int64_t D,
                 float scale, At at, float* p) {
  int64_t s = 0;
  for (; s + 4 <= S; s += 4) {
    const T* ks[4] = {k + at(b, kv, s), k + at(b, kv, s + 1), k + at(b, kv, s + 2), k + at(b, kv, s + 3)};
    key_scores<4>(q, ks, D, scale, p + s);
  }
  for (; s < S; ++s) {
    const T* kr = k + at(b, kv, s);
    key_scores<1>(q, &kr, D, scale, p + s);
  }
  if (mask)
    for (int64_t t = 0; t < S; ++t)
      if (!mask[b * S + t]) p[t] = -INFINITY;
}

// o[i0, i0 + 8 NV) = the sum over s of w[s] * v_s there, for the keys with w[s] >= 0 (-1 marks a key without
// weight): each element's sum in key order from zero, in NV registers.
template <int NV, typename T, typename At>
inline void value_sums(const float* w, const T* v, int64_t b, int64_t kv, int64_t S, int64_t i0, At at, float* o) {
  __m256 acc[NV];
  for (auto& a : acc) a = _mm256_setzero_ps();
  for (int64_t s = 0; s < S; ++s)
    if (w[s] >= 0) {
      const __m256 ws = _mm256_set1_ps(w[s]);
      const T* vr = v + at(b, kv, s) + i0;
      for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(ws, load8(vr + 8 * j), acc[j]);
    }
  for (int j = 0; j < NV; ++j) _mm256_storeu_ps(o + i0 + 8 * j, acc[j]);
}

// o = the sum over s of w[s] * v_s (value_sums), 64 elements of D at a time, then 8, then one.
template <typename T, typename At>
void weighted_values(const float* w, const T* v, int64_t b, int64_t kv, int64_t S, int64_t D, At at, float* o) {
  int64_t i0 = 0;
  for (; i0 + 64 <= D; i0 += 64) value_sums<8>(w, v, b, kv, S, i0, at, o);
  for (; i0 + 8 <= D; i0 += 8) value_sums<1>(w, v, b, kv, S, i0, at, o);
  for (; i0 < D; ++i0) {
    float acc = 0;
    for (int64_t s = 0; s < S; ++s)
      if (w[s] >= 0) acc += w[s] * static_cast<float>(v[at(b, kv, s) + i0]);
    o[i0] = acc;
  }
}

// Scores p[0, S) -> softmax weights in place, -1 for a key with no weight (masked: exp gave 0). p has room up to
// the next multiple of 8, which is padded with -inf: every key sits in lane s % 8 of 8-wide sums, and a key past
// S adds an exact 0 to its lane, so a row's weights do not depend on how many masked keys a batch pads it with.
inline void softmax_weights(float* p, int64_t S) {
  const int64_t S8 = (S + 7) / 8 * 8;
  std::fill(p + S, p + S8, -INFINITY);
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t s = 0; s < S8; s += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + s));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  const __m256 mx = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256 sum = _mm256_setzero_ps();
  for (int64_t s = 0; s < S8; s += 8) {
    __m256 e = _mm256_sub_ps(_mm256_loadu_ps(p + s), mx);
    if (Sleef_expf8_u10avx2) {
      e = Sleef_expf8_u10avx2(e);
    } else {
      _mm256_store_ps(lanes, e);
      for (float& x : lanes) x = std::exp(x);
      e = _mm256_load_ps(lanes);
    }
    _mm256_storeu_ps(p + s, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 total = _mm256_set1_ps(hsum(sum)), zero = _mm256_setzero_ps(), none = _mm256_set1_ps(-1.0f);
  for (int64_t s = 0; s < S8; s += 8) {
    const __m256 e = _mm256_loadu_ps(p + s);
    _mm256_storeu_ps(p + s, _mm256_blendv_ps(none, _mm256_div_ps(e, total), _mm256_cmp_ps(e, zero, _CMP_GT_OQ)));
  }
}

// One query per (row, head): softmax(q . K^T * scale, masked) . V, reading K/V in their stored dtype.
// `at(b, kv, s)` gives the offset of row b's key s of KV head kv in k (and in v, which has the same layout).
template <typename T, typename At>
void decode_attention_impl(const float* q, const T* k, const T* v, const bool* mask, float* out, int64_t B,
                           int64_t Hq, int64_t Hkv, int64_t S, int64_t D, float scale, At at) {
  const int64_t group = Hq / Hkv;
  hearth::parallel_for(0, B * Hq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> p((S + 7) / 8 * 8);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hq, kv = bh % Hq / group;
      head_scores(q + bh * D, k, mask, b, kv, S, D, scale, at, p.data());
      softmax_weights(p.data(), S);
      weighted_values(p.data(), v, b, kv, S, D, at, out + bh * D);
    }
  });
}

const bool* mask_ptr(const c10::optional<torch::Tensor>& mask, torch::Tensor& keep, int64_t B, int64_t S,
                     const char* what) {
  if (!mask.has_value()) return nullptr;
  keep = mask->contiguous();
  TORCH_CHECK(keep.scalar_type() == torch::kBool && keep.numel() == B * S, what, ": mask must be bool [B, S]");
  return keep.data_ptr<bool>();
}

}  // namespace

// q [B, Hq, D] float32; k, v [B, Hkv, S, D] (fp32/fp16/bf16, last dim contiguous); mask [B, S] bool or
// None -> [B, Hq, D] float32. Decode attention in one call, without converting the cache to fp32.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 3, "decode_attention: q must be float32 [B, Hq, D]");
  TORCH_CHECK(k.dim() == 4 && k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == v.scalar_type() &&
                  k.strides() == v.strides() && k.sizes() == v.sizes(),
              "decode_attention: k, v must be [B, Hkv, S, D] alike, with a contiguous last dim");
  auto qc = q.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1), S = k.size(2);
  TORCH_CHECK(Hq % Hkv == 0 && k.size(3) == D && k.size(0) == B, "decode_attention: shape mismatch");
  torch::Tensor keep;
  const bool* mp = mask_ptr(mask, keep, B, S, "decode_attention");
  auto out = torch::empty({B, Hq, D}, qc.options());
  const int64_t s0 = k.stride(0), s1 = k.stride(1), s2 = k.stride(2);
  by_float_dtype(k, "decode_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_attention_impl(qc.data_ptr<float>(), k.data_ptr<T>(), v.data_ptr<T>(), mp, out.data_ptr<float>(), B, Hq,
                          Hkv, S, D, static_cast<float>(scale),
                          [=](int64_t b, int64_t kv, int64_t s) { return b * s0 + kv * s1 + s * s2; });
  });
  return out;
}

// The same over a paged cache: K, V [Hkv, slots, D] contiguous, row b's keys at slots[b, :] (int64 [B, S]),
// read in place: no gather of the rows' blocks into a [B, Hkv, S, D] copy first.
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor K, torch::Tensor V, torch::Tensor slots,
                                     c10::optional<torch::Tensor> mask, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && q.dim() == 3, "paged_decode_attention: q must be float32 [B, Hq, D]");
  TORCH_CHECK(K.dim() == 3 && K.is_contiguous() && V.is_contiguous() && K.sizes() == V.sizes() &&
                  K.scalar_type() == V.scalar_type(),
              "paged_decode_attention: K, V must be contiguous [Hkv, slots, D] alike");
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 2 && slots.size(0) == q.size(0),
              "paged_decode_attention: slots must be int64 [B, S]");
  auto qc = q.contiguous();
  auto sl = slots.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = K.size(0), NS = K.size(1), S = sl.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && K.size(2) == D, "paged_decode_attention: shape mismatch");
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * S; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < NS, "paged_decode_attention: slot ", sp[i], " out of range");
  torch::Tensor keep;
  const bool* mp = mask_ptr(mask, keep, B, S, "paged_decode_attention");
  auto out = torch::empty({B, Hq, D}, qc.options());
  by_float_dtype(K, "paged_decode_attention", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    decode_attention_impl(qc.data_ptr<float>(), K.data_ptr<T>(), V.data_ptr<T>(), mp, out.data_ptr<float>(), B, Hq,
                          Hkv, S, D, static_cast<float>(scale),
                          [=](int64_t b, int64_t kv, int64_t s) { return (kv * NS + sp[b * S + s]) * D; });
  });
  return out;
}

// K[h, slots[i], :] = k[i, h, :] (and V from v): K, V [Hkv, slots, D] contiguous in the cache dtype; k, v
// [n, Hkv, D] float32 with a contiguous last dim. One call per layer instead of two index_copy_ and their
// conversions.
void kv_store(torch::Tensor K, torch::Tensor V, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
  TORCH_CHECK(K.dim() == 3 && K.is_contiguous() && V.is_contiguous() && K.sizes() == V.sizes() &&
                  K.scalar_type() == V.scalar_type(),
              "kv_store: K, V must be contiguous [Hkv, slots, D] alike");
  TORCH_CHECK(k.scalar_type() == torch::kFloat32 && v.scalar_type() == torch::kFloat32 && k.dim() == 3 &&
                  k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1,
              "kv_store: k, v must be float32 [n, Hkv, D] with a contiguous last dim");
  const int64_t H = K.size(0), NS = K.size(1), D = K.size(2), n = k.size(0);
  TORCH_CHECK(k.size(1) == H && k.size(2) == D, "kv_store: k, v must be [n, ", H, ", ", D, "]");
  auto sl = slots.contiguous();
  TORCH_CHECK(sl.scalar_type() == torch::kLong && sl.numel() == n, "kv_store: slots must be int64 [n]");
  const int64_t* sp = sl.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(sp[i] >= 0 && sp[i] < NS, "kv_store: slot ", sp[i], " out of range");
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0), v1 = v.stride(1);
  by_float_dtype(K, "kv_store", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    T *Kp = K.data_ptr<T>(), *Vp = V.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i)
      for (int64_t h = 0; h < H; ++h) {
        T* kd = Kp + (h * NS + sp[i]) * D;
        T* vd = Vp + (h * NS + sp[i]) * D;
        const float *ks = kp + i * k0 + h * k1, *vs = vp + i * v0 + h * v1;
        for (int64_t d = 0; d < D; ++d) {
          kd[d] = static_cast<T>(ks[d]);
          vd[d] = static_cast<T>(vs[d]);
        }
      }
  });
}

namespace {

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }
inline float gelu_tanh(float a) {
  constexpr float c = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * a * (1.0f + std::tanh(c * (a + 0.044715f * a * a * a)));
}

void silu_mul_row(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  if (Sleef_expf8_u10avx2) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= I; i += 8) {
      const __m256 a = _mm256_loadu_ps(g + i);
      const __m256 e = Sleef_expf8_u10avx2(_mm256_sub_ps(zero, a));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
    }
  }
  for (; i < I; ++i) o[i] = silu(g[i]) * u[i];
}

void gelu_tanh_mul_row(const float* g, const float* u, float* o, int64_t I) {
  int64_t i = 0;
  if (Sleef_tanhf8_u10avx2) {
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), k = _mm256_set1_ps(0.044715f);
    for (; i + 8 <= I; i += 8) {
      const __m256 a = _mm256_loadu_ps(g + i);
      const __m256 inner = _mm256_mul_ps(c, _mm256_add_ps(a, _mm256_mul_ps(k, _mm256_mul_ps(a, _mm256_mul_ps(a, a)))));
      const __m256 t = Sleef_tanhf8_u10avx2(inner);
      const __m256 act = _mm256_mul_ps(_mm256_mul_ps(half, a), _mm256_add_ps(one, t));
      _mm256_storeu_ps(o + i, _mm256_mul_ps(act, _mm256_loadu_ps(u + i)));
    }
  }
  for (; i < I; ++i) o[i] = gelu_tanh(g[i]) * u[i];
}

}  // namespace

// act(gate) * up for x = [gate | up] [..., 2I] float32 -> [..., I]: silu, or gelu with the tanh
// approximation, in one pass instead of chunk, act and mul (three ops and two temporaries per layer).
torch::Tensor act_mul(torch::Tensor x, const std::string& act) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "act_mul: x must be float32");
  TORCH_CHECK(act == "silu" || act == "gelu_tanh", "act_mul: unknown activation ", act);
  auto xc = x.contiguous();
  const int64_t I = xc.size(-1) / 2, rows = xc.numel() / (2 * I);
  auto sizes = xc.sizes().vec();
  sizes.back() = I;
  auto y = torch::empty(sizes, xc.options());
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto row = act == "silu" ? silu_mul_row : gelu_tanh_mul_row;
  for (int64_t r = 0; r < rows; ++r) row(xp + r * 2 * I, xp + r * 2 * I + I, yp + r * I, I);
  return y;
}
