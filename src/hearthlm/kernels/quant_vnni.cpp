// The AVX-512 VNNI path of quant_gemv for 8-bit weights: any number of x rows (a decode batch, a speculative
// verify step, a short prefill chunk) in one pass over the weights. The extension is compiled for AVX2, so these
// functions carry the AVX-512 target themselves, and quant_gemv calls them only after set_gemv_isa("avx512")
// found the CPU able.
//
// At one x row decode streams the weights from memory and the arithmetic hides behind it. At 16 rows the
// arithmetic is 16 times larger and the memory the same, so what counts is the work per product. Here it is
// done in a layout made for that:
// - 16 weight rows at a time (a tile) are transposed in cache, a chunk of K at a time, into "quads": one 64-byte
//   vector per 4 consecutive elements, holding those 4 elements of each of the 16 rows (a 32-bit lane per row),
//   as w + 128 (w ^ 0x80), since vpdpbusd takes its first operand unsigned. The weights in memory keep the one
//   QuantTensor layout; the transposed chunk is 16 KB per thread and lives in L1.
// - One vpdpbusd multiplies a quad by 4 elements of one x row (x^, signed, broadcast to every lane) and adds 64
//   products into the 16 rows' integer sums. A unit (a block of 32, or 16 for group 16) is 8 or 4 of them.
// - The unit's integer sum starts at -128 * sum(x^ over the unit), which undoes the + 128, so it is exactly the
//   dot product of the weights' integers with x^. It is converted to float once per unit, times (weight scale *
//   x scale), and added to the row's float sum; with mins, the group's min times x's scaled sum over the unit is
//   added after it.
// Per 64 products an x row costs one vpdpbusd, plus three float operations per unit (against four instructions
// per 64 products when the lanes run along K), and the transposition's 4 shuffles per quad are shared by all x
// rows. Up to kFewRows x rows that sharing does not pay for the transposition, and row_pass runs the weights as
// they lie instead, summing each unit's lanes in integers afterwards. Both paths give every unit the same exact
// integer sum and then the same float stage (add_unit), so each (weight row, x row) pair gives the same result bit
// for bit whatever the rows beside it: a row's result does not depend on M, on the batch or on the path.
//
// 4-bit weights stay on quant_cpu.cpp's VNNI kernel (8 rows a pass): there, with twice the elements per byte,
// the unit sums' reduction and the scales' transposition cost more than one row's memory time, and one row is
// what single-stream decode runs (measured: docs/cpu-kernels.md).
#include "quant_vnni.h"

#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu_kernels.h"
#include "threadpool.h"

#define HEARTH_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

namespace {

constexpr int kTile = 16;          // weight rows per tile: one per 32-bit lane
constexpr int64_t kChunk = 1024;   // elements of K transposed at a time: 256 quads, 16 KB
constexpr int kRowsPerPass = 8;    // x rows per pass over a chunk: 8 integer and 8 float sums in registers
constexpr int32_t kOffset = -128;  // per unit of x^'s sum: undoes the weights' + 128
constexpr int kFewRows = 4;        // up to this many x rows skip the transposition (row_pass; measured, see
                                   // docs/cpu-kernels.md)

struct alignas(64) Lanes16 {
  int32_t v[16];
};

struct Call {
  const QuantizedX* x;
  const uint8_t* q;  // [N][row_bytes]
  int64_t row_bytes, N, ng, group, unit;
  const at::Half* scales;  // [N][ng]
  const at::Half* mins;    // [N][ng] or null
  float* y;                // [M][N]
  std::vector<int64_t> passes;  // the x rows' cuts into passes of at most kRowsPerPass (transposing path)
};

// r[i] lane j -> r[j] lane i, for 16 vectors of 16 32-bit lanes.
HEARTH_VNNI inline void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows, interleaved per 32 bits
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 4 rows: r[i + c] holds column 4L + c of rows i..i+3 in 128-bit lane L
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // 8 rows: lanes 0, 2 of the 4-row groups, then lanes 1, 3
    t[c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
  }
  for (int c = 0; c < 8; ++c) {  // 16 rows: column c from t[c], t[8 + c]; column 8 + c from their odd lanes
    r[c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(t[c], t[8 + c], 0xdd);
  }
}

// 64 bytes at `p` (masked to `bytes`) of each of 16 rows `row_bytes` apart, transposed: r[j] = bytes 4j..4j+3 of
// every row. The same bytes of the next tile's rows are fetched into L2 on the way.
HEARTH_VNNI inline void load_transposed(const uint8_t* p, int64_t row_bytes, int64_t bytes, __m512i (&r)[16]) {
  if (bytes >= 64) {
#pragma GCC unroll 16
    for (int i = 0; i < kTile; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(p + (kTile + i) * row_bytes), _MM_HINT_T1);
      r[i] = _mm512_loadu_si512(p + i * row_bytes);
    }
  } else {
    const __mmask64 mask = (__mmask64(1) << bytes) - 1;
#pragma GCC unroll 16
    for (int i = 0; i < kTile; ++i) r[i] = _mm512_maskz_loadu_epi8(mask, p + i * row_bytes);
  }
  transpose16(r);
}

// The quads of elements [k0, k0 + kc) of the 16 rows at `w`, as unsigned bytes, into quads[0 .. kc / 4).
HEARTH_VNNI void transpose_chunk(const uint8_t* w, int64_t row_bytes, int64_t k0, int64_t kc, Lanes16* quads) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i r[16];
  for (int64_t e = 0; e < kc; e += 64) {  // 64 elements, 16 quads
    load_transposed(w + k0 + e, row_bytes, kc - e, r);
    if (kc - e >= 64) {
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) _mm512_store_si512(quads + e / 4 + j, _mm512_xor_si512(r[j], flip));
    } else {
      for (int j = 0; 4 * j < kc - e; ++j) _mm512_store_si512(quads + e / 4 + j, _mm512_xor_si512(r[j], flip));
    }
  }
}

// The fp16 values of each of the tile's rows (scales or mins: [N][ng]) as floats, one vector per group with a
// lane per row (rows past the end zero).
HEARTH_VNNI void transpose_groups(const at::Half* t, int64_t ng, int64_t n0, int rows, Lanes16* out) {
  if (ng <= 2) {  // (one group per row, as int8 heads have: the transposition would be mostly waste)
    for (int64_t g = 0; g < ng; ++g) {
      float* o = reinterpret_cast<float*>(out + g);
      for (int i = 0; i < kTile; ++i) o[i] = i < rows ? static_cast<float>(t[(n0 + i) * ng + g]) : 0.0f;
    }
    return;
  }
  for (int64_t g = 0; g < ng; g += 16) {
    const __mmask16 mask = ng - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (ng - g)) - 1);
    __m512i r[16];
    for (int i = 0; i < kTile; ++i)
      r[i] = i < rows ? _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, t + (n0 + i) * ng + g)))
                      : _mm512_setzero_si512();
    transpose16(r);
    for (int j = 0; j < 16 && g + j < ng; ++j) _mm512_store_si512(out + g + j, r[j]);
  }
}

// The float stage of unit u for MB x rows, the same in both paths: acc[m] += float(s[m]) * (weight scale * x
// scale), then with mins acc[m] += min * (x's scaled sum over the unit). s[m] is the unit's exact integer dot
// product (the offset included), a lane per weight row.
template <int MB>
HEARTH_VNNI inline void add_unit(__m512 (&a)[MB], const __m512i (&s)[MB], const Lanes16* scales, const Lanes16* mins,
                                 int64_t g, const float* const (&xd)[MB], const float* const (&xs)[MB], int64_t u) {
  const __m512 ws = _mm512_load_ps(reinterpret_cast<const float*>(scales + g));
  for (int m = 0; m < MB; ++m)
    a[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m]), _mm512_mul_ps(ws, _mm512_set1_ps(xd[m][u])), a[m]);
  if (mins) {
    const __m512 mn = _mm512_load_ps(reinterpret_cast<const float*>(mins + g));
    for (int m = 0; m < MB; ++m) a[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m][u]), a[m]);
  }
}

// Where x rows m0 .. m0 + MB - 1's data for a chunk starting at element k0 (unit u0) begins: x^, x's scale per
// unit, x's scaled and integer sums per unit.
template <int MB>
struct XRows {
  const int8_t* q[MB];
  const float* d[MB];
  const float* s[MB];
  const int32_t* i[MB];
  XRows(const QuantizedX& x, int64_t m0, int64_t k0, int64_t u0) {
    for (int m = 0; m < MB; ++m) {
      q[m] = x.q.data() + (m0 + m) * x.K + k0;
      d[m] = x.d.data() + (m0 + m) * x.nu_pad + u0;
      s[m] = x.sum.data() + (m0 + m) * x.nu_pad + u0;
      i[m] = x.isum.data() + (m0 + m) * x.nu_pad + u0;
    }
  }
};

// One pass of x rows m0 .. m0 + MB - 1 over the chunk's quads: their float sums acc[m] (a lane per weight row)
// take the chunk's units in order.
template <int MB>
HEARTH_VNNI void chunk_pass(const Call& c, int64_t k0, int64_t kc, int64_t m0, const Lanes16* quads,
                            const Lanes16* scales, const Lanes16* mins, Lanes16* acc) {
  const int64_t qpu = c.unit / 4;
  const XRows<MB> x(*c.x, m0, k0, k0 / c.unit);
  __m512 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm512_load_ps(reinterpret_cast<const float*>(acc + m0 + m));
  for (int64_t u = 0; u < kc / c.unit; ++u) {
    __m512i s[MB];
    for (int m = 0; m < MB; ++m) s[m] = _mm512_set1_epi32(kOffset * x.i[m][u]);
    for (int64_t j = u * qpu; j < (u + 1) * qpu; ++j) {
      const __m512i w = _mm512_load_si512(quads + j);
      for (int m = 0; m < MB; ++m) {
        int32_t x4;
        std::memcpy(&x4, x.q[m] + 4 * j, 4);
        s[m] = _mm512_dpbusd_epi32(s[m], w, _mm512_set1_epi32(x4));
      }
    }
    add_unit<MB>(a, s, scales, mins, (k0 + u * c.unit) / c.group, x.d, x.s, u);
  }
  for (int m = 0; m < MB; ++m) _mm512_store_ps(reinterpret_cast<float*>(acc + m0 + m), a[m]);
}

// ---------------------------------------------------------------------------------------------------------
// A few x rows (at most kFewRows). The transposition would cost more than the products it saves, so each weight
// row's 64 bytes run along K as they lie (lane i holds 4 consecutive elements), and the 16 rows' lanes are summed
// per unit afterwards, in integers: the same exact unit sums, so add_unit gives the same result bit for bit.

// Per 128-bit lane L: [a's lanes 4L..4L+3 summed, b's, c's, d's].
HEARTH_VNNI inline __m512i sum4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  return _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
}

// q[i] from sum4 of rows 4i..4i+3 -> p[L] lane r = row r's sum over lanes 4L..4L+3.
HEARTH_VNNI inline void by_row(const __m512i (&q)[4], __m512i (&p)[4]) {
  const __m512i u0 = _mm512_shuffle_i32x4(q[0], q[1], 0x44), u1 = _mm512_shuffle_i32x4(q[0], q[1], 0xee);
  const __m512i u2 = _mm512_shuffle_i32x4(q[2], q[3], 0x44), u3 = _mm512_shuffle_i32x4(q[2], q[3], 0xee);
  p[0] = _mm512_shuffle_i32x4(u0, u2, 0x88);
  p[1] = _mm512_shuffle_i32x4(u0, u2, 0xdd);
  p[2] = _mm512_shuffle_i32x4(u1, u3, 0x88);
  p[3] = _mm512_shuffle_i32x4(u1, u3, 0xdd);
}

// The 16 rows' 64 bytes at byte `off` (masked to `bytes`) against MB x rows' 64 bytes for them -> the integer sums
// of the step's units, in K order (2, or 4 for group 16); returns how many.
template <int MB, bool HALF>
HEARTH_VNNI inline int step_units(const uint8_t* w, int64_t row_bytes, int64_t off, int64_t bytes,
                                  const __m512i (&xv)[MB], __m512i (&units)[MB][4]) {
  const __mmask64 mask = bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
  const __m512i zero = _mm512_setzero_si512(), flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i q[MB][4];
  for (int i = 0; i < 4; ++i) {
    __m512i v[MB][4];
    for (int j = 0; j < 4; ++j) {
      const uint8_t* p = w + (4 * i + j) * row_bytes + off;
      _mm_prefetch(reinterpret_cast<const char*>(p + kTile * row_bytes), _MM_HINT_T1);
      const __m512i r = bytes >= 64 ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi8(mask, p);
      const __m512i wu = _mm512_xor_si512(r, flip);
      for (int m = 0; m < MB; ++m) v[m][j] = _mm512_dpbusd_epi32(zero, wu, xv[m]);
    }
    for (int m = 0; m < MB; ++m) q[m][i] = sum4(v[m][0], v[m][1], v[m][2], v[m][3]);
  }
  for (int m = 0; m < MB; ++m) {
    __m512i p[4];
    by_row(q[m], p);
    if constexpr (HALF) {
      for (int L = 0; L < 4; ++L) units[m][L] = p[L];
    } else {
      units[m][0] = _mm512_add_epi32(p[0], p[1]);
      units[m][1] = _mm512_add_epi32(p[2], p[3]);
    }
  }
  return static_cast<int>(bytes >= 64 ? 64 : bytes) / (HALF ? 16 : 32);
}

// acc[m] += the chunk's units for x rows 0 .. MB - 1.
template <int MB, bool HALF>
HEARTH_VNNI void row_pass(const Call& c, const uint8_t* w, int64_t k0, int64_t kc, const Lanes16* scales,
                          const Lanes16* mins, Lanes16* acc) {
  constexpr int64_t unit = HALF ? 16 : 32;
  const XRows<MB> x(*c.x, 0, k0, k0 / unit);
  __m512 a[MB];
  for (int m = 0; m < MB; ++m) a[m] = _mm512_load_ps(reinterpret_cast<const float*>(acc + m));
  for (int64_t e = 0; e < kc; e += 64) {
    const int64_t bytes = std::min<int64_t>(64, kc - e);
    const __mmask64 mask = bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
    __m512i xv[MB], units[MB][4];
    for (int m = 0; m < MB; ++m) xv[m] = _mm512_maskz_loadu_epi8(mask, x.q[m] + e);
    const int n = step_units<MB, HALF>(w, c.row_bytes, k0 + e, bytes, xv, units);
    for (int i = 0, u = static_cast<int>(e / unit); i < n; ++i, ++u) {
      __m512i s[MB];
      for (int m = 0; m < MB; ++m) s[m] = _mm512_add_epi32(units[m][i], _mm512_set1_epi32(kOffset * x.i[m][u]));
      add_unit<MB>(a, s, scales, mins, (k0 + u * unit) / c.group, x.d, x.s, u);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_store_ps(reinterpret_cast<float*>(acc + m), a[m]);
}

using Pass = void (*)(const Call&, int64_t, int64_t, int64_t, const Lanes16*, const Lanes16*, const Lanes16*,
                      Lanes16*);
constexpr Pass kPasses[kRowsPerPass] = {chunk_pass<1>, chunk_pass<2>, chunk_pass<3>, chunk_pass<4>,
                                        chunk_pass<5>, chunk_pass<6>, chunk_pass<7>, chunk_pass<8>};

using RowPass = void (*)(const Call&, const uint8_t*, int64_t, int64_t, const Lanes16*, const Lanes16*, Lanes16*);
template <bool HALF>
constexpr RowPass kRowPassesOf[kFewRows] = {row_pass<1, HALF>, row_pass<2, HALF>, row_pass<3, HALF>,
                                            row_pass<4, HALF>};
constexpr const RowPass* kRowPasses[2] = {kRowPassesOf<false>, kRowPassesOf<true>};  // [group == 16][rows - 1]

// What a thread keeps between tiles: the chunk's quads, its groups' scales and mins, the x rows' sums, and the
// last tile's rows padded with zero rows to 16.
struct Scratch {
  std::vector<Lanes16> quads, scales, mins, acc;
  std::vector<uint8_t> padded;
};

inline void grow(std::vector<Lanes16>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// y[:, n0 : n0 + rows] for one tile.
HEARTH_VNNI void tile(const Call& c, int64_t n0, Scratch& t) {
  const QuantizedX& x = *c.x;
  const int rows = static_cast<int>(std::min<int64_t>(kTile, c.N - n0));
  const uint8_t* w = c.q + n0 * c.row_bytes;
  if (rows < kTile) {
    t.padded.assign(kTile * c.row_bytes, 0);
    std::memcpy(t.padded.data(), w, rows * c.row_bytes);
    w = t.padded.data();
  }
  // The next tile's scales and mins: short streams of their own that the prefetchers do not see coming, and each
  // chunk would wait for their cache lines in the middle of the weights' stream.
  for (const at::Half* p : {c.scales, c.mins}) {
    if (!p) continue;
    const char* next = reinterpret_cast<const char*>(p + (n0 + kTile) * c.ng);
    for (int64_t off = 0; off < kTile * c.ng * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
  }
  // The tile's scales and mins, all its groups at once: the 16 rows' are contiguous, so they stream in two short
  // runs rather than as 32 interleaved ones beside the weights' 16.
  transpose_groups(c.scales, c.ng, n0, rows, t.scales.data());
  if (c.mins) transpose_groups(c.mins, c.ng, n0, rows, t.mins.data());
  const Lanes16* mins = c.mins ? t.mins.data() : nullptr;
  const int64_t M = x.M;
  std::fill(t.acc.begin(), t.acc.begin() + M, Lanes16{});
  for (int64_t k0 = 0; k0 < x.K; k0 += kChunk) {
    const int64_t kc = std::min(kChunk, x.K - k0);
    if (M <= kFewRows) {
      kRowPasses[c.unit == 16][M - 1](c, w, k0, kc, t.scales.data(), mins, t.acc.data());
      continue;
    }
    transpose_chunk(w, c.row_bytes, k0, kc, t.quads.data());
    for (size_t i = 0; i + 1 < c.passes.size(); ++i) {
      const int64_t a = c.passes[i], b = c.passes[i + 1];
      kPasses[b - a - 1](c, k0, kc, a, t.quads.data(), t.scales.data(), mins, t.acc.data());
    }
  }
  const __mmask16 keep = static_cast<__mmask16>((1u << rows) - 1);
  for (int64_t m = 0; m < M; ++m)
    _mm512_mask_storeu_ps(c.y + m * c.N + n0, keep, _mm512_load_ps(reinterpret_cast<const float*>(&t.acc[m])));
}

}  // namespace

void quant_gemv_wide(const QuantizedX& qx, const uint8_t* q, int64_t row_bytes, const at::Half* scales,
                     const at::Half* mins, float* y, int64_t N, int64_t group) {
  Call c;
  c.x = &qx;
  c.q = q;
  c.row_bytes = row_bytes;
  c.N = N;
  c.ng = qx.K / group;
  c.group = group;
  c.unit = group == 16 ? 16 : 32;
  c.scales = scales;
  c.mins = mins;
  c.y = y;
  c.passes = even_cuts(qx.M, kRowsPerPass);
  const int64_t tiles = (N + kTile - 1) / kTile;
  // >= 256 KB of weights a task, several tiles, so that the prefetches of the next tile's weights and scales
  // serve the thread that runs it
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / (kTile * row_bytes));
  const int64_t groups = (c.ng + 15) / 16 * 16;
  hearth::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    thread_local Scratch t;  // kept between calls: decode makes ~100 a token, each in several tasks
    grow(t.quads, qx.M > kFewRows ? kChunk / 4 : 0);
    grow(t.scales, groups);
    grow(t.mins, mins ? groups : 0);
    grow(t.acc, qx.M);
    for (int64_t i = t0; i < t1; ++i) tile(c, i * kTile, t);
  });
}
