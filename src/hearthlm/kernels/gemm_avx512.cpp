// Prefill products with quantized weights (the QuantTensor layout of quant/tensor.py) as an integer GEMM on
// AVX-512 VNNI. Built only into the AVX-512 extension (kernels/cpu.py compiles it with -mavx512vnni and loads
// it when the CPU has the instructions).
//
// The arithmetic is the decode GEMV's (quant_cpu.cpp), in a layout made for many rows of x:
// - x is rounded to int8 once per call, in blocks of 32 with one float scale each (llama.cpp's Q8_0), and
//   stored as x^ + 128, because vpdpbusd multiplies unsigned bytes (x) by signed bytes (the weights).
// - The weights are packed per panel of 32 output columns, as BLAS libraries pack their operands: four
//   consecutive k of a column make one 32-bit lane, so one 64-byte load holds 16 columns and one vpdpbusd
//   adds 64 products into 16 column sums. The panel is packed into a buffer of the thread's (a few hundred
//   KB at most, kept in cache) and serves every row of x; the weights in memory keep the one layout decode
//   reads too, so there is never a second copy of them.
// - Per unit (a 32-element block, or 16 when group == 16) the int32 sums I are scaled in float:
//       y += d_x * (s * I + c) + m * (d_x * sum x^)        c = -128 * s * (sum of the unit's weight integers)
//   where c undoes the +128 of x, s and m are the weight group's scale and min, and the integer of a
//   symmetric 4-bit weight is q - 8. So y = W . x^ exactly, up to float32 rounding: the same bound as the GEMV.
// - Panels are handed out in pieces by hearthlm's thread pool (threadpool.h), from a shared counter, so a core that
//   another process slows takes fewer of them instead of holding up the whole product.
#include "gemm_avx512.h"

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "quant_weights.h"
#include "threadpool.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using hearth::QuantWeights;
using hearth::unpack_row;

constexpr int kCols = 32;  // output columns per panel: two vectors of 16 int32 lanes
constexpr int kRows = 6;   // rows of x per register tile: 6 x 2 int32 sums + 6 x 2 float sums + 4 in 32 registers

// x rounded per block of 32 and offset by 128 for VNNI (signed for AMX, whose TDPBSSD takes signed bytes); per
// unit, the block's scale and d * (sum of x^ over the unit).
struct Activations {
  int64_t M = 0, K = 0, U = 0, unit = 32;
  std::vector<uint8_t> q;  // [M][K]
  std::vector<float> d;    // [M][U]
  std::vector<float> sum;  // [M][U]
};

void quantize_row(const float* x, int64_t K, int64_t unit, int bias, uint8_t* q, float* d, float* sum) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i offset = _mm512_set1_epi32(bias);
  const int per_block = static_cast<int>(32 / unit);
  for (int64_t b = 0; b < K / 32; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, abs_mask), _mm512_and_ps(v1, abs_mask)));
    const __mmask16 nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
    // A NaN or infinity in x makes the block's scale NaN, so that it shows in the output.
    const bool finite = std::isfinite(amax) && !nan;
    const float scale = finite ? amax / 127.0f : std::numeric_limits<float>::quiet_NaN();
    const __m512 inv = _mm512_set1_ps(finite && scale != 0.0f ? 1.0f / scale : 0.0f);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtepi32_epi8(_mm512_add_epi32(q0, offset)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(q1, offset)));
    const float s0 = static_cast<float>(_mm512_reduce_add_epi32(q0));
    const float s1 = static_cast<float>(_mm512_reduce_add_epi32(q1));
    if (per_block == 2) {
      d[2 * b] = d[2 * b + 1] = scale;
      sum[2 * b] = scale * s0;
      sum[2 * b + 1] = scale * s1;
    } else {
      d[b] = scale;
      sum[b] = scale * (s0 + s1);
    }
  }
}

void quantize(const float* x, int64_t M, int64_t K, int64_t unit, int bias, Activations& a) {
  a.M = M;
  a.K = K;
  a.unit = unit;
  a.U = K / unit;
  const int64_t padded = (M + 15) / 16 * 16;  // the AMX path reads whole tiles of 16 rows; the extra rows are
  a.q.assign(padded * K, bias);               // x^ = 0 and never stored
  a.d.assign(padded * a.U, 0.0f);
  a.sum.assign(padded * a.U, 0.0f);
  hearth::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      quantize_row(x + m * K, K, unit, bias, a.q.data() + m * K, a.d.data() + m * a.U, a.sum.data() + m * a.U);
  });
}

// One panel: up to 32 columns, packed. q: [K / 4][32][4] signed integers; per unit u, 32 floats each of the
// scale s, the correction c and (with mins) the min. Columns past the matrix are zero.
struct Panel {
  std::vector<int8_t> rows;  // [32][K]: the columns' integers, unpacked, before the interleave
  std::vector<int8_t> q;
  std::vector<float> s, c, m;
};

void pack_panel(const QuantWeights& w, int64_t n0, int64_t unit, Panel& p) {
  const int64_t K = w.K, U = K / unit, cols = std::min<int64_t>(kCols, w.N - n0);
  p.rows.assign(kCols * K, 0);
  p.q.resize(K * kCols);
  p.s.assign(U * kCols, 0.0f);
  p.c.resize(U * kCols);
  p.m.assign(w.mins ? U * kCols : 0, 0.0f);
  for (int64_t j = 0; j < cols; ++j) {
    unpack_row(w, n0 + j, p.rows.data() + j * K, w.mins ? 0 : 8);
    for (int64_t u = 0; u < U; ++u) {
      const int64_t g = u * unit / w.group;
      p.s[u * kCols + j] = static_cast<float>(w.scales[(n0 + j) * w.ng + g]);
      if (w.mins) p.m[u * kCols + j] = static_cast<float>(w.mins[(n0 + j) * w.ng + g]);
    }
  }
  // The interleave: lane j of step t holds k = 4t..4t+3 of column j. Its 32-bit words are gathered from the
  // 32 rows, 16 at a time; the weight sums per unit come from the packed vectors (128 * w by vpdpbusd).
  const __m512i stride = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(static_cast<int>(K)));
  const __m512i x128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t steps = unit / 4;
  for (int64_t u = 0; u < U; ++u) {
    __m512i sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t t = u * steps; t < (u + 1) * steps; ++t) {
      for (int h = 0; h < 2; ++h) {
        const int8_t* base = p.rows.data() + h * 16 * K + 4 * t;
        const __m512i v = _mm512_i32gather_epi32(stride, base, 1);
        _mm512_storeu_si512(p.q.data() + t * 128 + h * 64, v);
        sum[h] = _mm512_dpbusd_epi32(sum[h], x128, v);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512 s = _mm512_loadu_ps(p.s.data() + u * kCols + 16 * h);
      _mm512_storeu_ps(p.c.data() + u * kCols + 16 * h, _mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), s),
                                                                     _mm512_cvtepi32_ps(sum[h])));
    }
  }
}

// y[m0 : m0 + R, n0 : n0 + cols] from one packed panel.
template <int R, bool MINS>
void tile(const Activations& a, int64_t m0, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols,
          const float* bias) {
  const int64_t K = a.K, U = a.U, steps = a.unit / 4;
  __m512 f[R][2];
  for (int r = 0; r < R; ++r) f[r][0] = f[r][1] = _mm512_setzero_ps();
  const uint8_t* x[R];
  for (int r = 0; r < R; ++r) x[r] = a.q.data() + (m0 + r) * K;
  const int8_t* wq = p.q.data();
  for (int64_t u = 0; u < U; ++u) {
    __m512i acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t t = u * steps; t < (u + 1) * steps; ++t) {
      const __m512i w0 = _mm512_loadu_si512(wq + t * 128), w1 = _mm512_loadu_si512(wq + t * 128 + 64);
      for (int r = 0; r < R; ++r) {
        int32_t word;
        std::memcpy(&word, x[r] + 4 * t, 4);
        const __m512i xb = _mm512_set1_epi32(word);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], xb, w0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], xb, w1);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512 s = _mm512_loadu_ps(p.s.data() + u * kCols + 16 * h);
      const __m512 c = _mm512_loadu_ps(p.c.data() + u * kCols + 16 * h);
      __m512 mn = _mm512_setzero_ps();
      if constexpr (MINS) mn = _mm512_loadu_ps(p.m.data() + u * kCols + 16 * h);
      for (int r = 0; r < R; ++r) {
        const __m512 t = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(acc[r][h]), c);
        f[r][h] = _mm512_fmadd_ps(_mm512_set1_ps(a.d[(m0 + r) * U + u]), t, f[r][h]);
        if constexpr (MINS) f[r][h] = _mm512_fmadd_ps(mn, _mm512_set1_ps(a.sum[(m0 + r) * U + u]), f[r][h]);
      }
    }
  }
  for (int h = 0; h < 2; ++h) {
    const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * h));
    const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + 16 * h) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + 16 * h, mask, _mm512_add_ps(f[r][h], b));
  }
}

template <bool MINS>
void panel_rows(const Activations& a, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols, const float* bias) {
  int64_t m = 0;
  for (; m + kRows <= a.M; m += kRows) tile<kRows, MINS>(a, m, p, y, N, n0, cols, bias);
  switch (a.M - m) {
    case 5: tile<5, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 4: tile<4, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 3: tile<3, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 2: tile<2, MINS>(a, m, p, y, N, n0, cols, bias); break;
    case 1: tile<1, MINS>(a, m, p, y, N, n0, cols, bias); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// AMX: the same products on the CPU's tile unit. Per unit, a tile of 16 rows of x times a tile of 16 columns of
// the packed panel (its layout is the one the tile unit reads) gives 16 x 16 int32 sums in one TDPBSSD (x kept
// signed: no +128 to undo). The tile unit does the integer work many times faster than VPDPBUSD, so the float
// epilogue is most of the time: it keeps its 16 sums in registers, and two units are in flight at once so that
// the tile unit works on the next while the epilogue scales the last.

// Linux hands out the AMX register state only on request, once per process.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Even units: tmm0 sums, tmm2 x, tmm3 weights; odd units: tmm1, tmm4, tmm5.
void configure_tiles(int64_t unit) {
  TileConfig c;
  for (int t : {0, 1}) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  for (int t : {2, 4}) {
    c.rows[t] = 16;
    c.colsb[t] = static_cast<uint16_t>(unit);
  }
  for (int t : {3, 5}) {
    c.rows[t] = static_cast<uint8_t>(unit / 4);
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// acc[r] += x scale * (weight scale * sums[r]) (+ min * sum of x) for the 16 rows of one unit's sums.
template <bool MINS>
inline void epilogue(const Activations& a, int64_t m0, int64_t u, const Panel& p, int h, const int32_t* sums,
                     __m512 (&acc)[16]) {
  const int64_t U = a.U;
  const __m512 s = _mm512_loadu_ps(p.s.data() + u * kCols + 16 * h);
  __m512 mn = _mm512_setzero_ps();
  if constexpr (MINS) mn = _mm512_loadu_ps(p.m.data() + u * kCols + 16 * h);
  const float* d = a.d.data() + m0 * U + u;
  const float* xs = a.sum.data() + m0 * U + u;
  for (int r = 0; r < 16; ++r) {
    const __m512 t = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_load_si512(sums + 16 * r)));
    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(d[r * U]), t, acc[r]);
    if constexpr (MINS) acc[r] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[r * U]), acc[r]);
  }
}

// y[m0 : m0 + rows, n0 + 16h : n0 + 16h + 16] (rows <= 16; x is padded to 16 rows) from one packed panel.
template <bool MINS>
void tile_amx(const Activations& a, int64_t m0, int64_t rows, const Panel& p, int h, float* y, int64_t N,
              int64_t n0, int64_t cols, const float* bias, int32_t (*sums)[256]) {
  const int64_t K = a.K, U = a.U, unit = a.unit;
  const uint8_t* x = a.q.data() + m0 * K;
  const int8_t* w = p.q.data() + 64 * h;
  const int64_t step = unit / 4 * 128;  // bytes of the panel per unit
  __m512 acc[16];
  for (auto& v : acc) v = _mm512_setzero_ps();
  int64_t u = 0;
  for (; u + 2 <= U; u += 2) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_loadd(2, x + u * unit, K);
    _tile_loadd(3, w + u * step, 128);
    _tile_loadd(4, x + (u + 1) * unit, K);
    _tile_loadd(5, w + (u + 1) * step, 128);
    _tile_dpbssd(0, 2, 3);
    _tile_dpbssd(1, 4, 5);
    _tile_stored(0, sums[0], 64);
    epilogue<MINS>(a, m0, u, p, h, sums[0], acc);  // while the tile unit works on unit u + 1
    _tile_stored(1, sums[1], 64);
    epilogue<MINS>(a, m0, u + 1, p, h, sums[1], acc);
  }
  if (u < U) {
    _tile_zero(0);
    _tile_loadd(2, x + u * unit, K);
    _tile_loadd(3, w + u * step, 128);
    _tile_dpbssd(0, 2, 3);
    _tile_stored(0, sums[0], 64);
    epilogue<MINS>(a, m0, u, p, h, sums[0], acc);
  }
  const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * h));
  const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
  const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + 16 * h) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + 16 * h, mask, _mm512_add_ps(acc[r], b));
}

template <bool MINS>
void panel_rows_amx(const Activations& a, const Panel& p, float* y, int64_t N, int64_t n0, int64_t cols,
                    const float* bias, int32_t (*sums)[256]) {
  for (int64_t m = 0; m < a.M; m += 16)
    for (int h = 0; h < (cols > 16 ? 2 : 1); ++h)
      tile_amx<MINS>(a, m, std::min<int64_t>(16, a.M - m), p, h, y, N, n0, cols, bias, sums);
}

}  // namespace

bool amx_available() { return amx_permitted(); }

torch::Tensor quant_gemm(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t bits, int64_t group, c10::optional<torch::Tensor> bias, bool amx) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, "quant_gemm: bits must be 4, 5, 6 or 8");
  TORCH_CHECK(!amx || amx_permitted(), "quant_gemm: the kernel cannot use AMX here (no CPU support or no permission)");
  TORCH_CHECK(qdata.dim() == 2 && qdata.is_contiguous() && qdata.element_size() == 1,
              "quant_gemm: qdata must be a contiguous 2-D tensor of bytes");
  const int64_t N = qdata.size(0), K = qdata.size(1) * 8 / bits;  // (5- and 6-bit: unpack_row widens them to bytes)
  TORCH_CHECK(x.size(-1) == K && K % 32 == 0, "quant_gemm: x's last dim must be K, a multiple of 32");
  TORCH_CHECK((group == 16 || group % 32 == 0) && K % group == 0,
              "quant_gemm: group must divide K and be 16 or a multiple of 32");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous(), "quant_gemm: scales must be contiguous float16");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / group,
              "quant_gemm: scales do not fit the weights and group");
  TORCH_CHECK(!mins || (mins->scalar_type() == torch::kHalf && mins->is_contiguous() && mins->sizes() == scales.sizes()),
              "quant_gemm: mins must be contiguous float16 shaped as scales");
  const auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  auto y = torch::empty({M, N}, xf.options());
  const int64_t unit = group == 16 ? 16 : 32;
  Activations a;
  quantize(xf.data_ptr<float>(), M, K, unit, amx ? 0 : 128, a);
  const QuantWeights w{static_cast<const uint8_t*>(qdata.data_ptr()), N, K, qdata.size(1),  // int8 read as bytes
                  reinterpret_cast<const at::Half*>(scales.data_ptr()),
                  mins ? reinterpret_cast<const at::Half*>(mins->data_ptr()) : nullptr, scales.size(1), group, bits};
  c10::optional<torch::Tensor> b;
  if (bias) b = bias->to(torch::kFloat32).contiguous();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t panels = (N + kCols - 1) / kCols;
  hearth::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
    Panel p;
    alignas(64) int32_t sums[2][256];
    if (amx) configure_tiles(unit);  // tile configuration is per thread: set for each piece
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * kCols, cols = std::min<int64_t>(kCols, N - n0);
      pack_panel(w, n0, unit, p);
      if (amx && w.mins)
        panel_rows_amx<true>(a, p, yp, N, n0, cols, bp, sums);
      else if (amx)
        panel_rows_amx<false>(a, p, yp, N, n0, cols, bp, sums);
      else if (w.mins)
        panel_rows<true>(a, p, yp, N, n0, cols, bp);
      else
        panel_rows<false>(a, p, yp, N, n0, cols, bp);
    }
    if (amx) _tile_release();
  }, panels);
  return y.view([&] {
    auto shape = x.sizes().vec();
    shape.back() = N;
    return shape;
  }());
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights on AMX-BF16: TDPBF16PS multiplies pairs of bf16 and sums them in float32 inside the tile, so
// unlike the integer GEMM there is no per-block epilogue: a 16 x 16 tile of y is summed over all of K and
// stored once. x is split into two bf16 halves, hi = bf16(x) and lo = bf16(x - hi), which carry 16 of its 24
// bits, and both multiply the same weight tile: y is W . x up to float32 rounding and 2^-16 of x, the same
// numbers as the float32 path whatever the row count (oneDNN's bf16 GEMM rounds x and y to bf16 instead).
namespace {

// tmm0, tmm1: y (16 x 16 float32, two column halves); tmm2, tmm3: 16 rows x 32 k of x's hi and lo halves;
// tmm4, tmm5: 32 k x 16 columns of the weights, in pairs of k per 32-bit lane.
void configure_bf16_tiles() {
  TileConfig c;
  for (int t = 0; t < 6; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

// Transposes 16 x 16 32-bit words in registers: word j of r[i] goes to word i of r[j].
inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // t[i], t[i + 1]: words 4L..4L+1 and 4L+2..4L+3 of rows i, i + 1 interleaved
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // r[4a + c], 128-bit lane L: word 4L + c of rows 4a..4a+3
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of r[c], r[4 + c], r[8 + c], r[12 + c] into word 4L + c's vector
    const __m512i a0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i b0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i b1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    t[c] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    t[8 + c] = _mm512_shuffle_i32x4(a0, b0, 0xdd);
    t[12 + c] = _mm512_shuffle_i32x4(a1, b1, 0xdd);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// The panel of output columns n0..n0+C-1 (zero past N): [K / 2][C][2] bf16, lane j of row t = W[n0 + j][2t, 2t + 1].
// Per 16 columns and 32 k, the 16 rows' 64-byte pieces are loaded whole and transposed as 32-bit words (a gather
// per pair of k was 3x slower at K = 2048, where the 16 rows, 4 KB apart, fall in one L1 set).
template <int C>
void pack_bf16_panel(const uint16_t* W, int64_t N, int64_t K, int64_t n0, std::vector<uint16_t>& panel) {
  panel.resize(K * C);
  for (int h = 0; h < C / 16; ++h) {
    const int64_t first = n0 + 16 * h;
    for (int64_t k = 0; k < K; k += 32) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = first + i < N ? _mm512_loadu_si512(W + (first + i) * K + k) : _mm512_setzero_si512();
      transpose16(r);
      for (int j = 0; j < 16; ++j) _mm512_storeu_si512(panel.data() + (k / 2 + j) * 2 * C + 16 * h * 2, r[j]);
    }
  }
}

void bf16_panel_amx(const uint16_t* hi, const uint16_t* lo, int64_t M, int64_t K, const std::vector<uint16_t>& panel,
                float* y, int64_t N, int64_t n0, const float* bias) {
  alignas(64) float out[2][256];
  const int64_t cols = std::min<int64_t>(kCols, N - n0);
  for (int64_t m0 = 0; m0 < M; m0 += 16) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t k = 0; k < K; k += 32) {
      _tile_loadd(2, hi + m0 * K + k, 2 * K);
      _tile_loadd(3, lo + m0 * K + k, 2 * K);
      _tile_loadd(4, panel.data() + k * kCols, 4 * kCols);
      _tile_loadd(5, panel.data() + k * kCols + 32, 4 * kCols);
      _tile_dpbf16ps(0, 2, 4);
      _tile_dpbf16ps(0, 3, 4);
      _tile_dpbf16ps(1, 2, 5);
      _tile_dpbf16ps(1, 3, 5);
    }
    _tile_stored(0, out[0], 64);
    _tile_stored(1, out[1], 64);
    for (int h = 0; h < 2; ++h) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(16, cols - 16 * h));
      if (!left) continue;
      const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + 16 * h) : _mm512_setzero_ps();
      for (int64_t r = 0; r < std::min<int64_t>(16, M - m0); ++r)
        _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + 16 * h, mask, _mm512_add_ps(_mm512_load_ps(out[h] + 16 * r), b));
    }
  }
}

// x's two bf16 halves and the rest of one product, shared by both paths.
// x's halves, as each path reads them (bf16_gemm lays them out):
// - AMX: two matrices [M rounded up to 16][K] (the tile unit reads whole tiles; the padding is zero);
// - AVX512-BF16: one [M][K / 2][2][2], per pair of k the hi pair then the lo pair, so that a row's two
//   broadcasts come from one 8-byte piece and a tile of rows reads R streams, not 2R.
struct Bf16Gemm {
  const uint16_t *hi, *lo;  // the first pair of row 0 of each half
  int64_t row, pair;        // their strides, in bf16 elements: from one row of x to the next, one pair of k to the next
  const uint16_t* W;        // [N][K]
  const float* bias;        // [N] or null
  float* y;                 // [M][N]
  int64_t M, N, K;
};

void bf16_gemm_amx(const Bf16Gemm& g) {
  const int64_t panels = (g.N + kCols - 1) / kCols;
  hearth::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint16_t> panel;
    configure_bf16_tiles();  // per thread: set for each piece
    for (int64_t i = i0; i < i1; ++i) {
      pack_bf16_panel<kCols>(g.W, g.N, g.K, i * kCols, panel);
      bf16_panel_amx(g.hi, g.lo, g.M, g.K, panel, g.y, g.N, i * kCols, g.bias);
    }
    _tile_release();
  }, panels);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights on AVX512-BF16, for CPUs that have it but no AMX (Zen 4, Cooper Lake), or AMX capped away by
// HEARTHLM_ISA=avx512. VDPBF16PS multiplies 16 lanes of bf16 pairs (exactly: 8-bit by 8-bit mantissas) and adds
// both products to 16 float32 sums, so with the same hi/lo halves of x it gives the AMX path's numbers.
// - Panels of kBf16Cols output columns in the AMX layout, [K / 2][kBf16Cols][2] bf16: one 64-byte load is 16
//   columns' next pair of k. A panel (256 KB at K = 2048) stays in L2 while every row of x passes over it.
// - The micro-kernel keeps an R x kBf16Cols block of y in R x 4 zmm registers over all of K. Per pair of k it
//   loads the panel's 4 vectors once and, per row, broadcasts the row's hi pair and lo pair (one 32-bit word
//   each) to all lanes; both add into the same sums: 8 VDPBF16PS per row and pair of k, 4 loads per 8R.
constexpr int kBf16Cols = 64;
constexpr int kBf16Rows = 6;  // 6 x 4 sums + 4 panel vectors + 2 broadcasts: 30 of the 32 zmm registers

inline __m512bh broadcast_pair(const uint16_t* p) {
  int32_t word;
  std::memcpy(&word, p, 4);
  return (__m512bh)_mm512_set1_epi32(word);
}

// y[m0 : m0 + R, n0 : n0 + cols] (+ bias) from one packed panel.
template <int R>
void bf16_tile_avx512(const Bf16Gemm& g, int64_t m0, const uint16_t* panel, int64_t n0, int64_t cols) {
  constexpr int V = kBf16Cols / 16;
  const uint16_t *hi = g.hi + m0 * g.row, *lo = g.lo + m0 * g.row;
  __m512 acc[R][V];
  for (auto& row : acc)
    for (auto& v : row) v = _mm512_setzero_ps();
  for (int64_t t = 0; t < g.K / 2; ++t) {
    __m512bh w[V];
    for (int v = 0; v < V; ++v) w[v] = (__m512bh)_mm512_loadu_si512(panel + 2 * (t * kBf16Cols + 16 * v));
    for (int r = 0; r < R; ++r) {
      const __m512bh h = broadcast_pair(hi + r * g.row + t * g.pair), l = broadcast_pair(lo + r * g.row + t * g.pair);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(_mm512_dpbf16_ps(acc[r][v], h, w[v]), l, w[v]);
    }
  }
  for (int v = 0; v < V && 16 * v < cols; ++v) {
    const int64_t left = std::min<int64_t>(16, cols - 16 * v);
    const __mmask16 mask = left >= 16 ? 0xffff : static_cast<__mmask16>((1u << left) - 1);
    const __m512 b = g.bias ? _mm512_maskz_loadu_ps(mask, g.bias + n0 + 16 * v) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(g.y + (m0 + r) * g.N + n0 + 16 * v, mask, _mm512_add_ps(acc[r][v], b));
  }
}

// The last M % kBf16Rows rows: the tile of exactly that many.
template <int R>
void bf16_rest_avx512(const Bf16Gemm& g, int64_t m0, const uint16_t* panel, int64_t n0, int64_t cols) {
  if constexpr (R > 0) {
    if (g.M - m0 == R)
      bf16_tile_avx512<R>(g, m0, panel, n0, cols);
    else
      bf16_rest_avx512<R - 1>(g, m0, panel, n0, cols);
  }
}

void bf16_gemm_avx512(const Bf16Gemm& g) {
  const int64_t panels = (g.N + kBf16Cols - 1) / kBf16Cols;
  hearth::parallel_for(0, panels, 1, [&](int64_t i0, int64_t i1) {
    std::vector<uint16_t> panel;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n0 = i * kBf16Cols, cols = std::min<int64_t>(kBf16Cols, g.N - n0);
      pack_bf16_panel<kBf16Cols>(g.W, g.N, g.K, n0, panel);
      int64_t m = 0;
      for (; m + kBf16Rows <= g.M; m += kBf16Rows) bf16_tile_avx512<kBf16Rows>(g, m, panel.data(), n0, cols);
      bf16_rest_avx512<kBf16Rows - 1>(g, m, panel.data(), n0, cols);
    }
  }, panels);
}

}  // namespace

bool avx512_bf16_available() { return __builtin_cpu_supports("avx512bf16"); }

torch::Tensor bf16_gemm(torch::Tensor x, torch::Tensor W, c10::optional<torch::Tensor> bias, bool amx) {
  TORCH_CHECK(!amx || amx_permitted(), "bf16_gemm: the AMX tile unit cannot be used here");
  TORCH_CHECK(amx || avx512_bf16_available(), "bf16_gemm: this CPU has no AVX512-BF16 instructions");
  TORCH_CHECK(W.scalar_type() == torch::kBFloat16 && W.dim() == 2 && W.is_contiguous(),
              "bf16_gemm: W must be a contiguous 2-D bfloat16 tensor");
  const int64_t N = W.size(0), K = W.size(1);
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K && K % 32 == 0, "bf16_gemm: x's last dim must be K (", K,
              "), a multiple of 32");
  TORCH_CHECK(x.is_floating_point(), "bf16_gemm: x must be a floating-point tensor");
  TORCH_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == N), "bf16_gemm: bias must be 1-D with N (", N,
              ") elements");
  const auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  const auto hi = xf.to(torch::kBFloat16), lo = (xf - hi.to(torch::kFloat32)).to(torch::kBFloat16);
  torch::Tensor halves;  // the layouts of Bf16Gemm
  if (amx) {
    halves = torch::zeros({2, (M + 15) / 16 * 16, K}, hi.options());
    halves[0].narrow(0, 0, M).copy_(hi);
    halves[1].narrow(0, 0, M).copy_(lo);
  } else {
    halves = torch::stack({hi.view({M, K / 2, 2}), lo.view({M, K / 2, 2})}, 2);  // [M][K / 2][hi, lo][2]
  }
  const auto* h = reinterpret_cast<const uint16_t*>(halves.data_ptr());
  auto y = torch::empty({M, N}, xf.options());
  c10::optional<torch::Tensor> b;
  if (bias) b = bias->to(torch::kFloat32).contiguous();
  const auto* w = reinterpret_cast<const uint16_t*>(W.data_ptr());
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  const Bf16Gemm g = amx ? Bf16Gemm{h, h + halves.stride(0), K, 2, w, bp, y.data_ptr<float>(), M, N, K}
                         : Bf16Gemm{h, h + 2, 2 * K, 4, w, bp, y.data_ptr<float>(), M, N, K};
  if (amx)
    bf16_gemm_amx(g);
  else
    bf16_gemm_avx512(g);
  auto shape = x.sizes().vec();
  shape.back() = N;
  return y.view(shape);
}
