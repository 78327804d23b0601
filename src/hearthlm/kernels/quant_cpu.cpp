// Kernels for quantized weights (the QuantTensor layout of quant/tensor.py) on x86 CPUs with AVX2 + FMA +
// F16C: a batch-1..8 GEMV straight from the packed integers, and a row dequantizer for embedding lookups
// and prefill tiles. On CPUs with AVX-512 VNNI the GEMV runs a second path (quant_gemv_vnni, below; for 8-bit
// weights quant_vnni.cpp, which takes any number of rows in one pass), with the same rounding of x and the same
// result up to float32 rounding; set_gemv_isa picks it.
//
// Decode reads every weight once per token, so it runs at the speed weights stream from memory. int4 weights
// are a quarter of bf16's bytes, but that only pays if the arithmetic keeps up, and converting every weight
// to float (unpack, int -> float, scale, FMA) costs more instructions than the memory leaves time for at
// 2 cores. So the GEMV multiplies in integers, as llama.cpp's Q4_0 x Q8_0 dot product does: each row of x is
// rounded once per call to int8 in blocks of 32 with one float scale each, and a weight block's dot product
// is a couple of byte multiply-adds (vpmaddubsw, 32 products each) whose int32 sums are scaled by
// (weight scale * x scale) and accumulated in float. The result is exactly W . x^ up to float32 rounding, x^
// being x rounded per block (each element off by at most 1/254 of its block's largest |x|). The offsets (a
// group's min, or the -2^(bits - 1) of symmetric 4-, 5- and 6-bit) multiply sums of x^ per group, outside the
// integer loop. 5- and 6-bit weights (GGUF's Q5_* and Q6_K at their own width) run the 4-bit steps with their high
// bits ORed onto the nibbles (quant_weights.h), on this AVX2 path on every machine.
//
// dequant_rows matches the PyTorch reference bit for bit: q * s is exact in float32 (at most 8 + 11
// significant bits), so q * s + m rounds once whether or not the compiler fuses it into an FMA.
#include "cpu_kernels.h"
#include "quant_vnni.h"
#include "quant_weights.h"
#include "quant_x.h"
#include "threadpool.h"

#include <torch/types.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// The sums of 8 vectors, in one vector.
inline __m256 hsum8(const __m256 (&v)[8]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

inline float half_to_float(const at::Half* p) { return _cvtsh_ss(p->x); }

// [v[i] x4, v[j] x4]: one scale per 16-element half of a 32-element dot product (the lanes of vpmaddwd).
inline __m256 spread(__m256 v, int i, int j) {
  return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(i, i, i, i, j, j, j, j));
}

// ---------------------------------------------------------------------------------------------------------
// A weight row's scales (or mins) per unit, 8 units at a time. Every row maps units to groups the same way,
// so the mapping is worked out once per call: chunk c's units take the 8 fp16 values from group base[c] on
// in the order perm[c] (8 units span at most 8 groups). base is clamped so that the load stays inside the
// row, or for rows of fewer than 8 groups inside the tensor (the last rows are copied out, padded, first).
struct alignas(32) Lanes8 {
  int32_t v[8];
};

struct alignas(32) Floats8 {
  float v[8];
};

struct ChunkGroups {
  std::vector<int64_t> base;
  std::vector<Lanes8> perm;
};

void plan_groups(int64_t nu, int64_t upg, ChunkGroups& cg) {
  const int64_t nchunks = (nu + 7) / 8, ng = nu / upg;
  cg.base.resize(nchunks);
  cg.perm.resize(nchunks);
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t u0 = 8 * c, base = ng >= 8 ? std::min(u0 / upg, ng - 8) : 0;
    for (int64_t i = 0; i < 8; ++i) cg.perm[c].v[i] = static_cast<int32_t>(std::min(u0 + i, nu - 1) / upg - base);
    cg.base[c] = base;
  }
}

inline __m256 unit_values8(const at::Half* row, int64_t base, __m256i perm) {
  return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + base))), perm);
}

struct GemvArgs {
  const QuantizedX* x;
  const uint8_t* q;        // [N][row_bytes]
  int64_t row_bytes;
  const at::Half* scales;  // [N][ng]
  const at::Half* mins;    // [N][ng] or null
  int64_t ng;
  const ChunkGroups* groups;
  bool sym;                // symmetric 4-, 5- or 6-bit: w = s * (q - 2^(bits - 1))
  int64_t prefetch_bytes;  // the least distance to prefetch weights ahead
  float* y;                // [M][N]
  int64_t N;
};

// Floats of multipliers per (weight row, x row): 32 per chunk of 8 units (8 for 8-bit weights, group >= 32).
template <int BITS, bool HALF>
constexpr int64_t dd_per_chunk() { return BITS == 8 && !HALF ? 8 : 32; }

// kSym: the symmetric offset of 4-, 5- and 6-bit weights without mins, w = s * (q - 2^(BITS - 1)).
enum Offsets { kNoOffsets, kSym, kMins };

// For weight rows n..n+R-1: dd (row r, x row m at (r * M + m) * dd_stride) = the multipliers of the integer
// dot products (weight scale times x scale, laid out as the inner loop consumes them), and corr[r][m] = the
// offset terms (8 partial sums): the sum over groups of min (or -8 scale) times the sum of x^ over the group.
template <int BITS, bool HALF, int M, int R, int OFF>
void tile_multipliers(const GemvArgs& a, int64_t n, float* __restrict dd, int64_t dd_stride, __m256 (*corr)[M]) {
  const int64_t nchunks = a.x->nu_pad / 8, nb = a.x->nb, ng = a.ng, nu_pad = a.x->nu_pad;
  const int64_t* __restrict base = a.groups->base.data();
  const Lanes8* __restrict perm = a.groups->perm.data();
  const float* __restrict xd = a.x->d.data();
  const float* __restrict xs = a.x->sum.data();
  const at::Half* srow[R];
  const at::Half* mrow[R];
  alignas(16) at::Half few[R][2][8];  // the last rows of fewer than 8 groups, padded to 8
  for (int r = 0; r < R; ++r) {
    srow[r] = a.scales + (n + r) * ng;
    mrow[r] = OFF == kMins ? a.mins + (n + r) * ng : nullptr;
    if (ng < 8 && (n + r) * ng + 8 > a.N * ng) {  // (elsewhere the load runs on into the next rows, unused)
      std::memset(few[r], 0, sizeof(few[r]));
      std::memcpy(few[r][0], srow[r], ng * sizeof(at::Half));
      srow[r] = few[r][0];
      if (OFF == kMins) {
        std::memcpy(few[r][1], mrow[r], ng * sizeof(at::Half));
        mrow[r] = few[r][1];
      }
    }
    for (int m = 0; m < M; ++m) corr[r][m] = _mm256_setzero_ps();
  }
  auto multipliers = [&](int64_t c, int r, __m256 s) {
    for (int m = 0; m < M; ++m) {
      const __m256 d = _mm256_mul_ps(s, _mm256_loadu_ps(xd + m * nu_pad + 8 * c));
      float* o = dd + (r * M + m) * dd_stride + c * dd_per_chunk<BITS, HALF>();
      if constexpr (BITS < 8 && HALF) {  // pair j of the chunk: low halves (units 4j, 4j+2), high (4j+1, 4j+3)
        _mm256_store_ps(o, spread(d, 0, 2));
        _mm256_store_ps(o + 8, spread(d, 1, 3));
        _mm256_store_ps(o + 16, spread(d, 4, 6));
        _mm256_store_ps(o + 24, spread(d, 5, 7));
      } else if constexpr (BITS < 8 || HALF) {  // 4- to 6-bit: pair j = blocks 2j, 2j+1; 8-bit, group 16: block j
        for (int j = 0; j < 4; ++j) _mm256_store_ps(o + 8 * j, spread(d, 2 * j, 2 * j + 1));
      } else {
        _mm256_store_ps(o, d);
      }
    }
  };
  for (int64_t c = 0; c < nchunks; ++c) {
    const __m256i p = _mm256_load_si256(reinterpret_cast<const __m256i*>(perm[c].v));
    const int64_t b = base[c];
    for (int r = 0; r < R; ++r) {
      const __m256 s = unit_values8(srow[r], b, p);
      if constexpr (OFF != kNoOffsets) {
        const __m256 off = OFF == kMins ? unit_values8(mrow[r], b, p) : s;  // kSym: times -2^(BITS - 1) below
        for (int m = 0; m < M; ++m)
          corr[r][m] = _mm256_fmadd_ps(off, _mm256_loadu_ps(xs + m * nu_pad + 8 * c), corr[r][m]);
      }
      multipliers(c, r, s);
    }
  }
  if constexpr (OFF == kSym)
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        corr[r][m] = _mm256_mul_ps(corr[r][m], _mm256_set1_ps(-static_cast<float>(1 << (BITS - 1))));
  if (BITS < 8 && (nb & 1)) {  // the unpaired last block takes low nibbles in lanes 0..3, high in 4..7
    const int64_t c = nchunks - 1;
    const int i = static_cast<int>((nb - 1) % (HALF ? 4 : 8));  // its place in the chunk, even
    for (int r = 0; r < R; ++r) {
      const __m256 s = unit_values8(srow[r], base[c], _mm256_load_si256(reinterpret_cast<const __m256i*>(perm[c].v)));
      for (int m = 0; m < M; ++m) {
        const __m256 d = _mm256_mul_ps(s, _mm256_loadu_ps(xd + m * nu_pad + 8 * c));
        float* o = dd + (r * M + m) * dd_stride + c * dd_per_chunk<BITS, HALF>();
        _mm256_store_ps(o + (HALF ? 8 : 4) * i, HALF ? spread(d, 2 * i, 2 * i + 1) : spread(d, i, i));
      }
    }
  }
}

// The most rows per tile: the multipliers of a tile's rows are laid out first, then its rows are streamed, R
// at a time. Several short rows a tile save per-row overhead; long rows go one (R) at a time, as weights do
// not stream while the multipliers are worked out (8 rows of K = 4864 at once lost a quarter of the speed).
template <int M, int R>
constexpr int tile_rows() { return 8 / M / R * R > R ? 8 / M / R * R : R; }

// y[:, n0:n1] for BITS-bit weights, M rows of x, R weight rows at a time (M * R accumulators in registers);
// HALF: group == 16.
template <int BITS, bool HALF, int M, int R>
void gemv_tile(const GemvArgs& a, int64_t n0, int64_t n1, float* dd) {
  constexpr int TR = tile_rows<M, R>();
  const QuantizedX& x = *a.x;
  const int64_t K = x.K, nb = x.nb, row_bytes = a.row_bytes, ng = a.ng, N = a.N;
  const int64_t dd_stride = x.nu_pad / 8 * dd_per_chunk<BITS, HALF>();
  const int64_t prefetch = std::max(R * row_bytes, a.prefetch_bytes);
  const int64_t tile = std::max<int64_t>(R, std::min<int64_t>(TR, 4096 / row_bytes) / R * R);  // ~4 KB of weights
  const uint8_t* const q = a.q;
  float* const y = a.y;
  const __m256i low4 = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  const int8_t* xq = x.q.data();
  // Each row's 8 partial sums wait in `pending` until 8 rows are done, to be added up together.
  static_assert(8 % R == 0, "R must divide 8");
  __m256 pending[M][8];
  int k = 0;  // rows pending
  int64_t n = n0;
  while (n + R <= n1) {
    const int64_t T = std::min<int64_t>(tile, (n1 - n) / R * R);  // rows in this tile, a multiple of R
    __m256 corr[TR][M];
    for (int64_t t = 0; t < T; t += R) {
      if (a.mins)
        tile_multipliers<BITS, HALF, M, R, kMins>(a, n + t, dd + t * M * dd_stride, dd_stride, corr + t);
      else if (a.sym)
        tile_multipliers<BITS, HALF, M, R, kSym>(a, n + t, dd + t * M * dd_stride, dd_stride, corr + t);
      else
        tile_multipliers<BITS, HALF, M, R, kNoOffsets>(a, n + t, dd + t * M * dd_stride, dd_stride, corr + t);
    }
    // The next tile's scales and mins: a short stream of their own that the prefetchers do not see coming,
    // and tile_multipliers would wait for each of their cache lines in turn.
    for (const at::Half* p : {a.scales, a.mins}) {
      if (!p) continue;
      const char* next = reinterpret_cast<const char*>(p + (n + T) * ng);
      for (int64_t off = 0; off < tile * ng * 2; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    for (int64_t t = 0; t < T; t += R) {
      const uint8_t* qrow[R];
      const float* drow[R][M];
      for (int r = 0; r < R; ++r) {
        qrow[r] = q + (n + t + r) * row_bytes;
        for (int m = 0; m < M; ++m) drow[r][m] = dd + ((t + r) * M + m) * dd_stride;
      }
      // R rows side by side are prefetched as one stream ahead of them, a line per row and step, at least R
      // rows (and prefetch_bytes) ahead, so that the rows that follow all start warm.
      const char* pf = reinterpret_cast<const char*>(qrow[0]) + prefetch;
      // Two sets of accumulators, for even and odd steps, where registers allow: one FMA chain per
      // accumulator would otherwise wait on the FMA latency.
      constexpr int A = M * R <= 4 ? 2 : 1;
      __m256 acc[A][M][R];
      for (int i = 0; i < A; ++i)
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) acc[i][m][r] = _mm256_setzero_ps();
      if constexpr (BITS < 8) {
        // One step: blocks 2j, 2j+1 of each row (32 bytes of nibbles; 5- and 6-bit: and 8 h bytes of high bits
        // from the row's plane of them, ORed on as bits 4 and up).
        constexpr int64_t h = BITS - 4;
        auto step = [&](int64_t j, __m256 (&ac)[M][R]) {
          __m256i lo[R], hi[R];
          for (int r = 0; r < R; ++r) {
            const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[r] + 32 * j));
            lo[r] = _mm256_and_si256(v, low4);
            hi[r] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
            if constexpr (h > 0) {
              __m256i tl, th;
              hearth::pair_high_bits(qrow[r] + K / 2 + 8 * h * j, h, tl, th);
              lo[r] = _mm256_or_si256(lo[r], tl);
              hi[r] = _mm256_or_si256(hi[r], th);
            }
          }
          for (int m = 0; m < M; ++m) {
            const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 64 * j));
            const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 64 * j + 32));
            for (int r = 0; r < R; ++r) {
              const __m256i pl = _mm256_maddubs_epi16(lo[r], xl), ph = _mm256_maddubs_epi16(hi[r], xh);
              if constexpr (HALF) {
                const float* d = drow[r][m] + 16 * j;
                const __m256 sl = _mm256_cvtepi32_ps(_mm256_madd_epi16(pl, ones));
                const __m256 sh = _mm256_cvtepi32_ps(_mm256_madd_epi16(ph, ones));
                ac[m][r] = _mm256_fmadd_ps(sl, _mm256_load_ps(d), ac[m][r]);
                ac[m][r] = _mm256_fmadd_ps(sh, _mm256_load_ps(d + 8), ac[m][r]);
              } else {  // both products belong to the same two blocks: add them as int16 (|sum| <= 4 * 63 * 127)
                const __m256i s = _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones);
                ac[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_load_ps(drow[r][m] + 8 * j), ac[m][r]);
              }
            }
          }
        };
        // A cache line of each row's nibbles (2 steps) per iteration, and the high bits that go with them.
        constexpr int64_t kStream = 64 + 16 * h;  // bytes of a row read per iteration
        const int64_t pairs = nb / 2;
        int64_t j = 0;
        for (; j + 2 <= pairs; j += 2, pf += R * kStream) {
          for (int64_t l = 0; l < R * kStream; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
          step(j, acc[0]);
          step(j + 1, acc[A - 1]);
        }
        if (j < pairs) step(j, acc[0]);
        if (nb & 1) {  // the last block, unpaired: low nibbles to lanes 0..3, high to 4..7
          const int64_t b = nb - 1;
          __m256i w[R];
          for (int r = 0; r < R; ++r) {
            const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow[r] + b * 16));
            w[r] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low4);
            if constexpr (h > 0) w[r] = _mm256_or_si256(w[r], hearth::high_bits(qrow[r] + K / 2 + 8 * h * pairs, h));
          }
          for (int m = 0; m < M; ++m) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + b * 32));
            for (int r = 0; r < R; ++r) {
              const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(w[r], xv), ones);
              const __m256 d = _mm256_load_ps(drow[r][m] + (HALF ? 16 : 8) * pairs);
              acc[A - 1][m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, acc[A - 1][m][r]);
            }
          }
        }
      } else {
        // One step: block b. vpmaddubsw multiplies unsigned by signed bytes, so it gets |w| and x with w's sign.
        auto step = [&](int64_t b, __m256 (&ac)[M][R]) {
          __m256i w[R], aw[R];
          for (int r = 0; r < R; ++r) {
            w[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qrow[r] + 32 * b));
            aw[r] = _mm256_sign_epi8(w[r], w[r]);
          }
          for (int m = 0; m < M; ++m) {
            const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + 32 * b));
            for (int r = 0; r < R; ++r) {
              const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, w[r])), ones);
              const __m256 d = HALF ? _mm256_load_ps(drow[r][m] + 8 * b) : _mm256_broadcast_ss(drow[r][m] + b);
              ac[m][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), d, ac[m][r]);
            }
          }
        };
        int64_t b = 0;
        for (; b + 2 <= nb; b += 2, pf += R * 64) {
          for (int r = 0; r < R; ++r) _mm_prefetch(pf + r * 64, _MM_HINT_T0);
          step(b, acc[0]);
          step(b + 1, acc[A - 1]);
        }
        if (b < nb) step(b, acc[0]);
      }
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r)
          pending[m][k + r] = _mm256_add_ps(A == 2 ? _mm256_add_ps(acc[0][m][r], acc[A - 1][m][r]) : acc[0][m][r],
                                            corr[t + r][m]);
      k += R;
      if (k == 8) {
        for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + n + t + R - 8, hsum8(pending[m]));
        k = 0;
      }
    }
    n += T;
  }
  for (int m = 0; m < M; ++m)
    for (int i = 0; i < k; ++i) y[m * N + n - k + i] = hsum(pending[m][i]);
  if constexpr (R > 1) {
    if (n < n1) gemv_tile<BITS, HALF, M, 1>(a, n, n1, dd);
  }
}

// Weight rows [n0, n1) of one slice of M x rows (a.x), in tiles of R weight rows.
template <int BITS, bool HALF, int M>
void slice_range(const GemvArgs& a, int64_t n0, int64_t n1) {
  // M = 1 streams one row at a time: a single sequential stream per thread is what the prefetchers follow
  // best (2 or 4 rows side by side streamed 20% / 30% slower at K = 4864, one thread). More rows of x have the
  // integer work to hide the memory behind, and share each weight load between them.
  constexpr int R = M == 1 ? 1 : (M <= 4 ? 2 : 1);
  constexpr int64_t most_rows = std::max(tile_rows<M, R>(), tile_rows<M, 1>());  // (R = 1 takes the last rows)
  std::vector<Floats8> dd(most_rows * M * (a.x->nu_pad / 8) * dd_per_chunk<BITS, HALF>() / 8);
  gemv_tile<BITS, HALF, M, R>(a, n0, n1, reinterpret_cast<float*>(dd.data()));
}

// f(n0, n1) for the weight rows in thread tasks of whole units of 16 rows, at least 64 KB of weights each. Both
// quantized GEMVs split their work so, and a task runs every slice of x on its rows before the next: a wide batch
// reads the weights from memory once and the later slices find them in cache.
template <typename F>
void by_weight_units(int64_t N, int64_t row_bytes, F f) {
  const int64_t unit = 16, units = (N + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / (unit * row_bytes));
  hearth::parallel_for(0, units, grain, [&](int64_t u0, int64_t u1) { f(u0 * unit, std::min(N, u1 * unit)); });
}

// y = W . x^ for x in slices of at most kPassRows rows (args[i] holds slice i and its part of y), each slice's rows
// running the instructions of a call of their own.
template <int BITS, bool HALF>
void gemv_slices(const std::vector<GemvArgs>& args) {
  by_weight_units(args[0].N, args[0].row_bytes, [&](int64_t n0, int64_t n1) {
    for (const GemvArgs& a : args)
      with_rows(a.x->M, "quant_gemv", [&](auto m) { slice_range<BITS, HALF, decltype(m)::value>(a, n0, n1); });
  });
}

// ---------------------------------------------------------------------------------------------------------
// The AVX-512 VNNI path. The extension is compiled for AVX2, so these functions carry the AVX-512 target
// themselves, and quant_gemv calls them only after set_gemv_isa("avx512") found the CPU able.
//
// One "step" is 64 bytes of a weight row: 4 blocks of 4-bit nibbles or 2 blocks of 8-bit weights. vpdpbusd
// multiplies unsigned bytes by signed bytes and adds each 4 products into a 32-bit lane, so a step takes one or
// two instructions per row of x, and each of its 16 lanes belongs to one block (and one unit):
// - 4-bit: the nibbles (0..15) go in as they are. The low nibbles of a step are elements 0..15 of its 4 blocks,
//   the high nibbles elements 16..31, so x is laid out per step as [first halves of its 4 blocks][second
//   halves]; lane i of both products belongs to block 4j + i / 4.
// - 8-bit: the weights are signed, so they go in as w + 128 (w ^ 0x80); the 128 * sum(x^) that adds is taken
//   off with the offsets. Lane i belongs to block 2j + i / 8.
// Scales are handled per chunk of 16 units (the steps that cover them): the 16 weight scales times x's 16 unit
// scales make one vector per row of x, and each step picks its lanes from it with a fixed permutation, so a
// step costs no scale loads. The offsets (-8 * scale for symmetric 4-bit, -128 * scale for 8-bit, plus a
// group's min) multiply x^'s sum per group, once per weight row. Each (weight row, x row) pair runs the same
// instructions in the same order whatever the number of x rows, so a row's result does not depend on the rows
// beside it.
#define HEARTH_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

struct alignas(64) Lanes16 {
  int32_t v[16];
};

// Steps per chunk of 16 units: 8-bit 2 units a step (4 for group 16), 4-bit 4 units (8 for group 16).
template <int BITS, bool HALF>
constexpr int steps_per_chunk() { return BITS == 8 ? (HALF ? 4 : 8) : (HALF ? 2 : 4); }

// The unit (within its chunk) of lane i of the chunk's step k; hi: the high nibbles of 4-bit.
int lane_unit(int bits, bool half, int k, int i, int hi) {
  if (bits == 4) return half ? 2 * (4 * k + i / 4) + hi : 4 * k + i / 4;
  return half ? 4 * k + i / 4 : 2 * k + i / 8;
}

// What all weight rows of a call share: x in the step layout, x's scale per unit, x^'s sums per group, and per
// chunk the groups of its units: 16 fp16 values from group base[c] on (gmask keeps the load inside the row),
// spread to units by perm.
struct VnniPlan {
  int64_t steps = 0, chunks = 0, ng = 0, ngp = 0, xstride = 0, row_bytes = 0;
  int64_t prefetch = 0;  // bytes ahead: a row at least (as gemv_tile), so the next row starts warm
  // 64-byte aligned, so that no 512-bit load of them straddles two cache lines.
  std::vector<Lanes16> xq;     // [M][xstride] int8
  std::vector<Lanes16> xd;     // [M][chunks * 16] floats, zero past the last unit
  std::vector<Lanes16> xsg;    // [M][ngp] floats, zero past ng
  std::vector<int64_t> base;   // [chunks]
  std::vector<__mmask16> gmask;
  std::vector<Lanes16> perm;   // [chunks]
};

void plan_vnni(const QuantizedX& qx, int bits, int64_t group, int64_t row_bytes, VnniPlan& p) {
  const bool half = group == 16;
  const int64_t M = qx.M, K = qx.K, nb = qx.nb, nu = qx.nu, upg = half ? 1 : group / 32;
  p.row_bytes = row_bytes;
  p.prefetch = std::max<int64_t>(row_bytes, 2048);
  p.steps = (row_bytes + 63) / 64;
  p.chunks = (nu + 15) / 16;
  p.ng = K / group;
  p.ngp = (p.ng + 15) / 16 * 16;
  p.xstride = p.steps * (bits == 4 ? 128 : 64);
  p.xq.assign(M * p.xstride / 64, Lanes16{});
  p.xd.assign(M * p.chunks, Lanes16{});
  p.xsg.assign(M * p.ngp / 16, Lanes16{});
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* src = qx.q.data() + m * K;
    int8_t* dst = reinterpret_cast<int8_t*>(p.xq.data()) + m * p.xstride;
    float* xd = reinterpret_cast<float*>(p.xd.data()) + m * p.chunks * 16;
    float* xsg = reinterpret_cast<float*>(p.xsg.data()) + m * p.ngp;
    for (int64_t b = 0; b < nb; ++b) {
      if (bits == 4) {
        int8_t* o = dst + (b / 4) * 128 + (b % 4) * 16;
        std::memcpy(o, src + 32 * b, 16);
        std::memcpy(o + 64, src + 32 * b + 16, 16);
      } else {
        std::memcpy(dst + 32 * b, src + 32 * b, 32);
      }
    }
    std::memcpy(xd, qx.d.data() + m * qx.nu_pad, nu * sizeof(float));
    const float* s = qx.sum.data() + m * qx.nu_pad;
    for (int64_t u = 0; u < nu; ++u) xsg[u / upg] += s[u];  // the units of a group in order
  }
  p.base.resize(p.chunks);
  p.gmask.resize(p.chunks);
  p.perm.resize(p.chunks);
  for (int64_t c = 0; c < p.chunks; ++c) {
    const int64_t base = 16 * c / upg;
    p.base[c] = base;
    p.gmask[c] = static_cast<__mmask16>((1u << std::min<int64_t>(16, p.ng - base)) - 1);
    for (int u = 0; u < 16; ++u) p.perm[c].v[u] = static_cast<int32_t>(std::min(16 * c + u, nu - 1) / upg - base);
  }
}

struct VnniArgs {
  const VnniPlan* p;
  const uint8_t* q;
  const at::Half* scales;
  const at::Half* mins;  // or null
  float offset;          // the offset per unit of scale: -8 (symmetric 4-bit), -128 (8-bit) or 0
  float* y;
  int64_t N;
};

// The lane -> unit permutations of a chunk's steps (idx[2k + hi]).
template <int BITS, bool HALF>
struct StepIndex {
  __m512i idx[2 * steps_per_chunk<BITS, HALF>()];
  HEARTH_VNNI StepIndex() {
    for (int k = 0; k < steps_per_chunk<BITS, HALF>(); ++k)
      for (int hi = 0; hi < 2; ++hi) {
        Lanes16 l;
        for (int i = 0; i < 16; ++i) l.v[i] = lane_unit(BITS, HALF, k, i, hi);
        idx[2 * k + hi] = _mm512_load_si512(l.v);
      }
  }
};

// Step j (the chunk's step k) of one weight row w for M rows of x: acc[m] += (integer dot products per lane) *
// D[m] (weight scale times x scale per unit of the chunk) picked to the lanes.
template <int BITS, bool HALF, int M>
HEARTH_VNNI inline void vnni_step(const VnniPlan& p, const uint8_t* w, int64_t j, int k, __mmask64 wmask,
                                  const StepIndex<BITS, HALF>& si, const __m512 (&D)[M], __m512 (&acc)[M]) {
  _mm_prefetch(reinterpret_cast<const char*>(w + 64 * j + p.prefetch), _MM_HINT_T0);
  const __m512i v = wmask == ~__mmask64(0) ? _mm512_loadu_si512(w + 64 * j) : _mm512_maskz_loadu_epi8(wmask, w + 64 * j);
  const int8_t* xq = reinterpret_cast<const int8_t*>(p.xq.data()) + j * (BITS == 4 ? 128 : 64);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lanes = si.idx[2 * k];
  if constexpr (BITS == 4) {
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    for (int m = 0; m < M; ++m) {
      const __m512i xl = _mm512_load_si512(xq + m * p.xstride), xh = _mm512_load_si512(xq + m * p.xstride + 64);
      if constexpr (HALF) {  // the low and high nibbles are different units: a scale each
        const __m512i il = _mm512_dpbusd_epi32(zero, lo, xl), ih = _mm512_dpbusd_epi32(zero, hi, xh);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(il), _mm512_permutexvar_ps(lanes, D[m]), acc[m]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ih), _mm512_permutexvar_ps(si.idx[2 * k + 1], D[m]), acc[m]);
      } else {  // both halves of a block in one lane: |sum| <= 32 * 15 * 127
        const __m512i i = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, lo, xl), hi, xh);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(lanes, D[m]), acc[m]);
      }
    }
  } else {
    const __m512i wu = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
    for (int m = 0; m < M; ++m) {
      const __m512i i = _mm512_dpbusd_epi32(zero, wu, _mm512_load_si512(xq + m * p.xstride));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_permutexvar_ps(lanes, D[m]), acc[m]);
    }
  }
}

// The offset terms of weight row n for M rows of x, 16 partial sums each: sum over groups of (min + offset *
// scale) * sum(x^). They are added to the dot products' partial sums lane by lane, so that a row takes one
// horizontal sum; not folded into the FMAs, whose single rounding of (dot - offset) would leave a residue where
// the two cancel exactly (a weight of 8 in symmetric 4-bit is an exact 0).
template <int M>
HEARTH_VNNI inline void vnni_offsets(const VnniArgs& a, int64_t n, __m512 (&acc)[M]) {
  const VnniPlan& p = *a.p;
  const at::Half* s = a.scales + n * p.ng;
  const at::Half* mn = a.mins ? a.mins + n * p.ng : nullptr;
  const __m512 c = _mm512_set1_ps(a.offset);
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ng; g += 16) {
    const __mmask16 k = p.ng - g >= 16 ? 0xffff : static_cast<__mmask16>((1u << (p.ng - g)) - 1);
    const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, s + g));
    const __m512 off = mn ? _mm512_fmadd_ps(sv, c, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mn + g)))
                          : _mm512_mul_ps(sv, c);
    const float* xs = reinterpret_cast<const float*>(p.xsg.data()) + g;
    for (int m = 0; m < M; ++m) acc[m] = _mm512_fmadd_ps(off, _mm512_load_ps(xs + m * p.ngp), acc[m]);
  }
}

// y[:, n0:n1], one weight row at a time: a single sequential stream, which the prefetchers follow best.
template <int BITS, bool HALF, int M>
HEARTH_VNNI void vnni_rows(const VnniArgs& a, int64_t n0, int64_t n1) {
  constexpr int S = steps_per_chunk<BITS, HALF>();
  const VnniPlan& p = *a.p;
  const StepIndex<BITS, HALF> si;
  const int64_t steps = p.steps, rem = p.row_bytes - 64 * (steps - 1);
  const __mmask64 full = ~__mmask64(0), last = rem == 64 ? full : (__mmask64(1) << rem) - 1;
  const float* xd = reinterpret_cast<const float*>(p.xd.data());
  const int64_t xds = p.chunks * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* w = a.q + n * p.row_bytes;
    const at::Half* s = a.scales + n * p.ng;
    // The next row's scales and mins: short streams of their own that the prefetchers do not see coming, and
    // the chunks would wait for each of their cache lines in turn in the middle of the row's stream.
    for (const at::Half* t : {a.scales, a.mins}) {
      if (!t) continue;
      const char* next = reinterpret_cast<const char*>(t + (n + 1) * p.ng);
      for (int64_t off = 0; off < 2 * p.ng; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    // Two sets of accumulators (even and odd steps), so that the FMAs do not wait on each other's latency.
    __m512 acc0[M], acc1[M], D[M];
    for (int m = 0; m < M; ++m) acc0[m] = acc1[m] = _mm512_setzero_ps();
    for (int64_t c = 0; c < p.chunks; ++c) {
      const __m512 g16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(p.gmask[c], s + p.base[c]));
      const __m512 ws = _mm512_permutexvar_ps(_mm512_load_si512(p.perm[c].v), g16);
      for (int m = 0; m < M; ++m) D[m] = _mm512_mul_ps(ws, _mm512_load_ps(xd + m * xds + 16 * c));
      const int64_t j0 = c * S;
      if (j0 + S < steps) {  // a whole chunk, before the last step
        for (int k = 0; k < S; k += 2) {
          vnni_step<BITS, HALF, M>(p, w, j0 + k, k, full, si, D, acc0);
          vnni_step<BITS, HALF, M>(p, w, j0 + k + 1, k + 1, full, si, D, acc1);
        }
      } else {  // the chunk with the last step, masked to the row
        for (int k = 0; k < S && j0 + k < steps; ++k)
          vnni_step<BITS, HALF, M>(p, w, j0 + k, k, j0 + k == steps - 1 ? last : full, si, D, k & 1 ? acc1 : acc0);
      }
    }
    __m512 corr[M];
    vnni_offsets<M>(a, n, corr);
    for (int m = 0; m < M; ++m)
      a.y[m * a.N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0[m], acc1[m]), corr[m]));
  }
}

// y's rows [n0, n1) for one slice of at most 8 x rows.
template <int BITS, bool HALF>
void vnni_range(const VnniArgs& a, int64_t M, int64_t n0, int64_t n1) {
  with_rows(M, "quant_gemv", [&](auto m) { vnni_rows<BITS, HALF, decltype(m)::value>(a, n0, n1); });
}

// y = W . x^ for x given as slices of at most 8 rows each (y's rows in the same order), split as by_weight_units
// says; each slice's rows run the instructions of a call of their own.
void quant_gemv_vnni(const std::vector<QuantizedX>& slices, const uint8_t* q, int64_t row_bytes,
                     const at::Half* scales, const at::Half* mins, int bits, int64_t group, float* y, int64_t N) {
  std::vector<VnniPlan> plans(slices.size());
  std::vector<VnniArgs> args(slices.size());
  int64_t m0 = 0;
  for (size_t i = 0; i < slices.size(); ++i) {
    plan_vnni(slices[i], bits, group, row_bytes, plans[i]);
    args[i] = VnniArgs{&plans[i], q, scales, mins, bits == 8 ? -128.0f : (mins ? 0.0f : -8.0f), y + m0 * N, N};
    m0 += slices[i].M;
  }
  const bool half = group == 16;
  const auto range = bits == 4 ? (half ? vnni_range<4, true> : vnni_range<4, false>)
                               : (half ? vnni_range<8, true> : vnni_range<8, false>);
  by_weight_units(N, row_bytes, [&](int64_t n0, int64_t n1) {
    for (size_t i = 0; i < slices.size(); ++i) range(args[i], slices[i].M, n0, n1);
  });
}

}  // namespace

// Checks the QuantTensor parts of one 2-D weight; returns K.
int64_t check_weight(const char* fn, const torch::Tensor& q, const torch::Tensor& scales,
                     const c10::optional<torch::Tensor>& mins, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 4 || bits == 5 || bits == 6 || bits == 8, fn, ": bits must be 4, 5, 6 or 8, got ", bits);
  TORCH_CHECK(q.device().is_cpu() && scales.device().is_cpu(), fn, ": tensors must be on the CPU");
  TORCH_CHECK(q.dim() == 2, fn, ": qdata must be 2-D [N, K * ", bits, " / 8], got ", q.sizes());
  TORCH_CHECK(q.scalar_type() == (bits == 8 ? torch::kInt8 : torch::kUInt8), fn, ": ", bits, "-bit qdata must be ",
              bits == 8 ? "int8" : "uint8", ", got ", q.scalar_type());
  TORCH_CHECK(q.is_contiguous(), fn, ": qdata must be contiguous");
  TORCH_CHECK(q.size(1) * 8 % bits == 0, fn, ": ", q.size(1), " bytes a row do not hold whole ", bits, "-bit blocks");
  const int64_t K = q.size(1) * 8 / bits;
  TORCH_CHECK(K > 0 && K % 32 == 0, fn, ": K must be a positive multiple of 32, got ", K);
  TORCH_CHECK(group > 0 && K % group == 0 && (group == 16 || group % 32 == 0), fn,
              ": group must divide K and be 16 or a multiple of 32, got group ", group, " for K ", K);
  TORCH_CHECK(scales.scalar_type() == torch::kFloat16 && scales.is_contiguous(), fn,
              ": scales must be contiguous float16, got ", scales.scalar_type());
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == q.size(0) && scales.size(1) == K / group, fn, ": scales ",
              scales.sizes(), " do not fit qdata ", q.sizes(), " with group ", group);
  if (mins.has_value()) {
    TORCH_CHECK(mins->device().is_cpu() && mins->scalar_type() == torch::kFloat16 && mins->is_contiguous(), fn,
                ": mins must be contiguous float16 on the CPU, got ", mins->scalar_type());
    TORCH_CHECK(mins->sizes() == scales.sizes(), fn, ": mins ", mins->sizes(), " must match scales ", scales.sizes());
  }
  return K;
}

// x [..., K] (any float dtype; on AVX2 in even slices of at most 8 rows, see kPassRows, in one pass over the
// weights), W the QuantTensor parts of a 2-D
// weight [N, K], bias float32 [N] or None -> x @ W^T + bias, float32 [..., N], with x rounded to int8 per block
// of 32 (see the header). The reshape and conversions happen here, not as separate calls from Python: decode makes
// ~100 of these a token.
torch::Tensor quant_gemv(torch::Tensor x, torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                         int64_t bits, int64_t group, c10::optional<torch::Tensor> bias) {
  const int64_t K = check_weight("quant_gemv", qdata, scales, mins, bits, group);
  TORCH_CHECK(x.device().is_cpu() && x.is_floating_point(), "quant_gemv: x must be a float tensor on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "quant_gemv: x must be [..., K] with K = ", K, ", got ", x.sizes());
  const int64_t N = qdata.size(0);
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous()),
              "quant_gemv: bias must be float32 [", N, "]");
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  x = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  TORCH_CHECK(x.size(0) >= 1, "quant_gemv: x has no rows");
  const int64_t M = x.size(0);
  const bool vnni = avx512_path();
  const bool half = group == 16;
  auto y = torch::empty({M, N}, x.options());
  if (N == 0) return y.view(out_shape);
  const auto* q = reinterpret_cast<const uint8_t*>(qdata.data_ptr());
  const at::Half* mn = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
  if (vnni && (bits == 4 || bits == 8)) {  // x in natural order; 4-bit in the even slices of AVX2 (kPassRows), which
                                           // plan_vnni lays out per step (5- and 6-bit weights: the AVX2 path)
    const auto cuts = even_cuts(M, bits == 8 ? M : kPassRows);  // (8-bit: quant_vnni.cpp takes all rows at once)
    std::vector<QuantizedX> slices(cuts.size() - 1);
    for (size_t i = 0; i < slices.size(); ++i)
      quantize_x(x.data_ptr<float>() + cuts[i] * K, cuts[i + 1] - cuts[i], K, false, half, slices[i]);
    if (bits == 8)
      quant_gemv_wide(slices[0], q, qdata.size(1), scales.data_ptr<at::Half>(), mn, y.data_ptr<float>(), N, group);
    else
      quant_gemv_vnni(slices, q, qdata.size(1), scales.data_ptr<at::Half>(), mn, 4, group, y.data_ptr<float>(), N);
    if (bias.has_value()) y.add_(*bias);
    return y.view(out_shape);
  }
  const auto cuts = even_cuts(M, kPassRows);
  const size_t n_slices = cuts.size() - 1;
  std::vector<QuantizedX> xs(n_slices);
  std::vector<GemvArgs> args(n_slices);
  ChunkGroups cg;
  for (size_t i = 0; i < n_slices; ++i) {
    quantize_x(x.data_ptr<float>() + cuts[i] * K, cuts[i + 1] - cuts[i], K, bits < 8, half, xs[i]);
    if (i == 0) plan_groups(xs[0].nu, half ? 1 : group / 32, cg);
    args[i] = GemvArgs{&xs[i], q, qdata.size(1), scales.data_ptr<at::Half>(), mn, K / group, &cg,
                       bits != 8 && !mins.has_value(), 2048, y.data_ptr<float>() + cuts[i] * N, N};
  }
  if (bits == 4)
    half ? gemv_slices<4, true>(args) : gemv_slices<4, false>(args);
  else if (bits == 5)
    half ? gemv_slices<5, true>(args) : gemv_slices<5, false>(args);
  else if (bits == 6)
    half ? gemv_slices<6, true>(args) : gemv_slices<6, false>(args);
  else
    half ? gemv_slices<8, true>(args) : gemv_slices<8, false>(args);
  if (bias.has_value()) y.add_(*bias);
  return y.view(out_shape);
}

namespace {

// One weight row to float32, with the reference's arithmetic: q * s + m, s * (q - 2^(BITS - 1)), s * q.
template <int BITS>
void dequant_row(const uint8_t* q, const at::Half* scales, const at::Half* mins, int64_t K, int64_t group, float* out) {
  const int64_t nb = K / 32, bpg = group / 32;  // bpg: blocks per group (0 when group == 16)
  const __m256 offset = _mm256_set1_ps(static_cast<float>(1 << (BITS - 1)));  // (symmetric: q - 2^(BITS - 1))
  __m256 s_lo = _mm256_setzero_ps(), s_hi = s_lo, m_lo = s_lo, m_hi = s_lo;
  for (int64_t b = 0, left = 0, g = 0; b < nb; ++b) {
    if (group == 16) {  // two groups per block
      s_lo = _mm256_set1_ps(half_to_float(scales + 2 * b));
      s_hi = _mm256_set1_ps(half_to_float(scales + 2 * b + 1));
      if (mins) {
        m_lo = _mm256_set1_ps(half_to_float(mins + 2 * b));
        m_hi = _mm256_set1_ps(half_to_float(mins + 2 * b + 1));
      }
    } else if (left-- == 0) {  // a new group
      s_lo = s_hi = _mm256_set1_ps(half_to_float(scales + g));
      if (mins) m_lo = m_hi = _mm256_set1_ps(half_to_float(mins + g));
      ++g;
      left = bpg - 1;
    }
    __m256 v[4];  // elements 0..7, 8..15, 16..23, 24..31 as floats
    if constexpr (BITS < 8) {
      __m128i lo, hi;
      hearth::block_ints(q, K, b, BITS, lo, hi);
      v[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      v[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(lo, lo)));
      v[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      v[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(hi, hi)));
    } else {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
      const __m128i lo = _mm256_castsi256_si128(p), hi = _mm256_extracti128_si256(p, 1);
      v[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
      v[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(lo, lo)));
      v[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
      v[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(hi, hi)));
    }
    for (int i = 0; i < 4; ++i) {
      const __m256 s = i < 2 ? s_lo : s_hi;
      __m256 w;
      if (mins)
        w = _mm256_add_ps(_mm256_mul_ps(v[i], s), i < 2 ? m_lo : m_hi);
      else if (BITS < 8)
        w = _mm256_mul_ps(s, _mm256_sub_ps(v[i], offset));
      else
        w = _mm256_mul_ps(s, v[i]);
      _mm256_storeu_ps(out + b * 32 + 8 * i, w);
    }
  }
}

}  // namespace

// The rows `rows` (int64 [R]) of the weight whose QuantTensor parts are given, as float32 [R, K], equal bit
// for bit to quant.tensor.dequantize(...)[rows].
torch::Tensor dequant_rows(torch::Tensor qdata, torch::Tensor scales, c10::optional<torch::Tensor> mins, int64_t bits,
                           int64_t group, torch::Tensor rows) {
  const int64_t K = check_weight("dequant_rows", qdata, scales, mins, bits, group);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == torch::kInt64 && rows.dim() == 1,
              "dequant_rows: rows must be a 1-D int64 tensor, got ", rows.scalar_type(), " ", rows.sizes());
  auto idx = rows.contiguous();
  const int64_t R = idx.size(0), N = qdata.size(0), row_bytes = qdata.size(1), ng = K / group;
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < N, "dequant_rows: row index ", ip[i], " out of range for ", N, " rows");
  auto out = torch::empty({R, K}, scales.options().dtype(torch::kFloat32));
  const uint8_t* q = reinterpret_cast<const uint8_t*>(qdata.data_ptr());
  const at::Half* s = scales.data_ptr<at::Half>();
  const at::Half* mn = mins.has_value() ? mins->data_ptr<at::Half>() : nullptr;
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / K);  // >= 16K elements per task
  hearth::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = ip[r];
      const at::Half* mrow = mn ? mn + n * ng : nullptr;
      if (bits == 4)
        dequant_row<4>(q + n * row_bytes, s + n * ng, mrow, K, group, o + r * K);
      else if (bits == 5)
        dequant_row<5>(q + n * row_bytes, s + n * ng, mrow, K, group, o + r * K);
      else if (bits == 6)
        dequant_row<6>(q + n * row_bytes, s + n * ng, mrow, K, group, o + r * K);
      else
        dequant_row<8>(q + n * row_bytes, s + n * ng, mrow, K, group, o + r * K);
    }
  });
  return out;
}

