// Prefill products with quantized weights (the QuantTensor layout of quant/tensor.py) as an integer GEMM on AVX2,
// for CPUs without AVX-512 VNNI (Zen 3 and older, most laptops before 2021). The AVX-512 extension's GEMM
// (gemm_avx512.cpp) is the model: the same rounding of x, the same panels, the same float epilogue per unit. What
// differs is the multiply. AVX2 has no vpdpbusd; its byte product vpmaddubsw multiplies unsigned by signed bytes,
// adds neighbours in pairs and saturates at 16 bits, so each width of weight takes the form that cannot saturate:
// - 4-bit weights are held as q - 8 in [-8, 7] and x as x^ + 128 in [1, 255]. A pair is at most 2 * 255 * 8 =
//   4080, so the pairs of a whole 32-element unit (8 steps of 4) add up in 16 bits (at most 32640) before one
//   vpmaddwd widens them: about one multiply instruction per 32 products. A group's min absorbs the 8 (the weight
//   is s (q - 8) + (m + 8 s)), and c = -128 s (sum of the unit's integers) undoes the + 128 as on AVX-512.
// - 8-bit weights reach -128, so x stays signed and llama.cpp's sign trick applies: |w| times x with w's sign,
//   at most 2 * 128 * 127 = 32512 a pair; vpmaddwd widens every step. Two multiplies per 32 products.
// The result is W . x^ exactly, up to float32 rounding: the decode GEMV's numbers (quant_cpu.cpp).
//
// Panels of 16 output columns: per step of 4 k, one 32-byte vector holds 8 columns' 4 consecutive bytes each, so
// one broadcast of a row's 4 bytes of x meets 8 columns in one instruction. A panel is packed (8 x 8 transposes of
// 32-bit words) into the thread's buffer and serves every row of x from cache; the weights in memory keep the one
// layout decode reads. Panels are handed out by hearthlm's thread pool from a shared counter.
#include "cpu_kernels.h"
#include "quant_weights.h"
#include "quant_x.h"
#include "threadpool.h"
#include "transpose8.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

using hearth::QuantWeights;
using hearth::transpose8;
using hearth::unpack_row;

constexpr int kCols = 16;  // output columns per panel: two vectors of 8 int32 lanes
constexpr int kRows = 4;   // rows of x per register tile: 4 x 2 sums, the weights and a broadcast in 16 registers

// x rounded per block (quant_x.h); for 4-bit weights also as unsigned bytes x^ + 128.
struct Activations {
  QuantizedX qx;
  std::vector<uint8_t> offset;  // [M][K], empty for 8-bit weights
  int64_t unit = 32;

  const uint8_t* row(int64_t m) const {
    return offset.empty() ? reinterpret_cast<const uint8_t*>(qx.q.data()) + m * qx.K : offset.data() + m * qx.K;
  }
};

// One panel of up to 16 columns. q: [K / 4][16][4] integers (4-bit: q - 8); per unit u, 16 floats each of the
// scale s, the correction c (4-bit) and the min (with mins; + 8 s for 4-bit). Columns past the matrix are zero.
struct Panel {
  std::vector<int8_t> rows;  // [16][K]: the columns' integers, before the interleave
  std::vector<int8_t> q;
  std::vector<float> s, c, m;
};

void pack_panel(const QuantWeights& w, int64_t n0, int64_t unit, Panel& p) {
  const int64_t K = w.K, U = K / unit, cols = std::min<int64_t>(kCols, w.N - n0);
  const bool four = w.bits == 4;
  p.rows.assign(kCols * K, 0);
  p.q.resize(K * kCols);
  p.s.assign(U * kCols, 0.0f);
  p.c.assign(four ? U * kCols : 0, 0.0f);
  p.m.assign(w.mins ? U * kCols : 0, 0.0f);
  for (int64_t j = 0; j < cols; ++j) {
    unpack_row(w, n0 + j, p.rows.data() + j * K, 8);  // 4-bit: q - 8, mins or not
    for (int64_t u = 0; u < U; ++u) {
      const int64_t g = (n0 + j) * w.ng + u * unit / w.group;
      const float s = static_cast<float>(w.scales[g]);
      p.s[u * kCols + j] = s;
      if (w.mins) p.m[u * kCols + j] = static_cast<float>(w.mins[g]) + (four ? 8.0f * s : 0.0f);
    }
  }
  for (int h = 0; h < 2; ++h)
    for (int64_t k = 0; k < K; k += 32) {
      __m256i r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.rows.data() + (8 * h + i) * K + k));
      transpose8(r);
      for (int j = 0; j < 8; ++j)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p.q.data() + (k / 4 + j) * 64 + 32 * h), r[j]);
    }
  if (!four) return;
  // c = -128 s (sum of the unit's integers per column), from the packed vectors.
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  const int64_t steps = unit / 4;
  for (int64_t u = 0; u < U; ++u)
    for (int h = 0; h < 2; ++h) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t t = u * steps; t < (u + 1) * steps; ++t) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q.data() + t * 64 + 32 * h));
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16));
      }
      const __m256 s = _mm256_loadu_ps(p.s.data() + u * kCols + 8 * h);
      _mm256_storeu_ps(p.c.data() + u * kCols + 8 * h, _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(-128.0f), s),
                                                                     _mm256_cvtepi32_ps(sum)));
    }
}

inline __m256i broadcast_word(const uint8_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return _mm256_set1_epi32(word);
}

// One unit's integer sums for R rows x 16 columns: [r][h] holds columns 8h..8h+7 as int32. x: row 0's first byte
// of the unit, rows K bytes apart; wq: the panel's first step of the unit. STEPS (unit / 4) is fixed, so the loop
// unrolls.
template <int R, int STEPS, bool FOUR>
inline void unit_sums(const uint8_t* x, int64_t K, const int8_t* wq, __m256i (&acc)[R][2]) {
  const __m256i ones16 = _mm256_set1_epi16(1);
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int t = 0; t < STEPS; ++t) {
    const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + t * 64));
    const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + t * 64 + 32));
    if constexpr (FOUR) {  // 16-bit sums over the unit (see the header)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i xb = broadcast_word(x + r * K + 4 * t);
        acc[r][0] = _mm256_add_epi16(acc[r][0], _mm256_maddubs_epi16(xb, w0));
        acc[r][1] = _mm256_add_epi16(acc[r][1], _mm256_maddubs_epi16(xb, w1));
      }
    } else {  // |w| times x carrying w's sign, widened every step
      const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i xb = broadcast_word(x + r * K + 4 * t);
        const __m256i p0 = _mm256_maddubs_epi16(a0, _mm256_sign_epi8(xb, w0));
        const __m256i p1 = _mm256_maddubs_epi16(a1, _mm256_sign_epi8(xb, w1));
        acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(p0, ones16));
        acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(p1, ones16));
      }
    }
  }
  if constexpr (FOUR)
    for (int r = 0; r < R; ++r)
      for (int h = 0; h < 2; ++h) acc[r][h] = _mm256_madd_epi16(acc[r][h], ones16);
}

// y[m0 : m0 + R, n0 : n0 + cols] (+ bias) from one packed panel; STEPS = unit / 4.
template <int R, int STEPS, bool FOUR, bool MINS>
void tile(const Activations& a, int64_t m0, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols,
          const float* bias) {
  const int64_t K = a.qx.K, U = K / a.unit, nu = a.qx.nu_pad;
  __m256 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm256_setzero_ps();
  const uint8_t* x = a.row(m0);
  const float* d = a.qx.d.data() + m0 * nu;
  const float* xs = a.qx.sum.data() + m0 * nu;
  for (int64_t u = 0; u < U; ++u) {
    __m256i acc[R][2];
    unit_sums<R, STEPS, FOUR>(x + 4 * STEPS * u, K, p.q.data() + 64 * STEPS * u, acc);
    for (int h = 0; h < 2; ++h) {
      const __m256 s = _mm256_loadu_ps(p.s.data() + u * kCols + 8 * h);
      const __m256 c = FOUR ? _mm256_loadu_ps(p.c.data() + u * kCols + 8 * h) : _mm256_setzero_ps();
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 t = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(acc[r][h]), c);
        f[r][h] = _mm256_fmadd_ps(_mm256_broadcast_ss(d + r * nu + u), t, f[r][h]);
      }
      if constexpr (MINS) {
        const __m256 mn = _mm256_loadu_ps(p.m.data() + u * kCols + 8 * h);
        for (int r = 0; r < R; ++r) f[r][h] = _mm256_fmadd_ps(mn, _mm256_broadcast_ss(xs + r * nu + u), f[r][h]);
      }
    }
  }
  // The sums leave their registers in one unrolled pass: indexed by a loop that is not unrolled, they would live in
  // memory, and GCC then stores them to the stack at every unit.
  alignas(32) float out[R][kCols];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    _mm256_store_ps(out[r], f[r][0]);
    _mm256_store_ps(out[r] + 8, f[r][1]);
  }
  for (int r = 0; r < R; ++r) {
    float* dst = y + (m0 + r) * N + n0;
    for (int64_t j = 0; j < cols; ++j) dst[j] = out[r][j] + (bias ? bias[n0 + j] : 0.0f);
  }
}

template <int STEPS, bool FOUR, bool MINS>
void panel_rows(const Activations& a, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols, const float* bias) {
  int64_t m = 0;
  for (; m + kRows <= a.qx.M; m += kRows) tile<kRows, STEPS, FOUR, MINS>(a, m, p, y, N, n0, cols, bias);
  switch (a.qx.M - m) {
    case 3: tile<3, STEPS, FOUR, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 2: tile<2, STEPS, FOUR, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 1: tile<1, STEPS, FOUR, MINS>(a, m, p, y, N, n0, cols, bias); break;
    default: break;
  }
}

template <int STEPS>
void panel(const Activations& a, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols, const float* bias,
           bool four, bool mins) {
  if (four && mins)
    panel_rows<STEPS, true, true>(a, p, y, N, n0, cols, bias);
  else if (four)
    panel_rows<STEPS, true, false>(a, p, y, N, n0, cols, bias);
  else if (mins)
    panel_rows<STEPS, false, true>(a, p, y, N, n0, cols, bias);
  else
    panel_rows<STEPS, false, false>(a, p, y, N, n0, cols, bias);
}

}  // namespace

torch::Tensor quant_gemm_avx2(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales,
                              c10::optional<torch::Tensor> mins, int64_t bits, int64_t group,
                              c10::optional<torch::Tensor> bias) {
  const int64_t K = check_weight("quant_gemm", qdata, scales, mins, bits, group);
  TORCH_CHECK(x.device().is_cpu() && x.is_floating_point(), "quant_gemm: x must be a float tensor on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "quant_gemm: x's last dim must be K (", K, "), got ", x.sizes());
  const int64_t N = qdata.size(0);
  TORCH_CHECK(!bias || bias->numel() == N, "quant_gemm: bias must have N (", N, ") elements");
  auto shape = x.sizes().vec();
  shape.back() = N;
  const auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return y.view(shape);
  Activations a;
  a.unit = group == 16 ? 16 : 32;
  quantize_x(xf.data_ptr<float>(), M, K, false, a.unit == 16, a.qx);
  if (bits == 4) {  // x^ + 128 as unsigned bytes: flip each byte's top bit
    a.offset.resize(M * K);
    const auto* src = reinterpret_cast<const uint8_t*>(a.qx.q.data());
    for (int64_t i = 0; i < M * K; ++i) a.offset[i] = src[i] ^ 0x80;
  }
  const QuantWeights w{reinterpret_cast<const uint8_t*>(qdata.data_ptr()), N, K, qdata.size(1), scales.data_ptr<at::Half>(),
                  mins ? mins->data_ptr<at::Half>() : nullptr, K / group, group, bits};
  c10::optional<torch::Tensor> b;
  if (bias) b = bias->to(torch::kFloat32).contiguous();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t panels = (N + kCols - 1) / kCols;
  hearth::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
    Panel p;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * kCols;
      pack_panel(w, n0, a.unit, p);
      const int64_t cols = std::min<int64_t>(kCols, N - n0);
      if (a.unit == 16)
        panel<4>(a, p, yp, N, n0, cols, bp, bits == 4, w.mins != nullptr);
      else
        panel<8>(a, p, yp, N, n0, cols, bp, bits == 4, w.mins != nullptr);
    }
  }, panels);
  return y.view(shape);
}
