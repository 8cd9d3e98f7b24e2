// The CPU scan of one score chunk in one pass per query: mask, per-block log-sum-exp, stage 1 of the
// two-stage Gumbel sampler, and the copy of each new winner's block for stage 2 (design §9). The fused
// scan and the fused top-k do the same straight from the rows: a register-blocked micro-kernel scores one
// (query group, block) tile at a time, which is reduced while it is in L1, so no score chunk exists.
//
// Built by sharded_negcache/native_scan.py when the CPU backend is resolved, or by `python -m
// sharded_negcache.build` (g++ >= 9 or clang, -O3 -march=native -fopenmp), and called through ctypes on
// tensors' data pointers by native_scan's checked wrappers (the argument lists there are tested against
// the signatures below). Written once with GCC vector extensions at the target's
// vector width (16 float lanes on AVX-512, 8 on AVX2, 4 elsewhere); the result is deterministic for
// a machine, and differs between widths only in the last bits (summation order). A fused score is
// one chain of fused multiply-adds over k = 0..d-1: its bits do not depend on the tile, lane or chunk.
//
// Numerics: exp(x) for x <= 0 is a polynomial on the exponent's fraction (see exp_nonpositive); the
// log of the Gumbel noise is the Cephes single-precision log (about 1 ulp). The hash and the uniforms
// are bit-identical to keyed_random.py.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Lanes: the target's native vector width (GCC lowers wider vector types piecewise or, for selects and
// conversions, lane by lane, several times slower than the native width).
#if defined(__AVX512F__)
#define LANES 16
#elif defined(__AVX__)
#define LANES 8
#else
#define LANES 4
#endif
constexpr int L = LANES;
typedef float vf __attribute__((vector_size(L * 4)));
typedef int32_t vi __attribute__((vector_size(L * 4)));
typedef uint32_t vu __attribute__((vector_size(L * 4)));
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

__attribute__((always_inline)) inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
__attribute__((always_inline)) inline vf splat(float x) { return vf{} + x; }
__attribute__((always_inline)) inline vf load_tail(const float* p, int64_t count) {  // count < L lanes, the rest -inf (no mass)
  vf v = splat(-std::numeric_limits<float>::infinity());
  for (int64_t i = 0; i < count; ++i) v[i] = p[i];
  return v;
}
__attribute__((always_inline)) inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// A lane permutation of v: GCC's __builtin_shuffle (GCC >= 4.7; __builtin_shufflevector only exists from
// GCC 12) or clang's __builtin_shufflevector. With constant lanes GCC lowers both to the same permutation
// (the same machine code), so the bits do not depend on the compiler's version.
#if defined(__clang__)
#define SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#else
#define SHUFFLE(v, ...) __builtin_shuffle(v, vi{__VA_ARGS__})
#endif

// Horizontal reductions by halving (a fixed order for a given lane count).
__attribute__((always_inline)) inline vf fold(vf v, bool is_max) {
  vf a;
#if LANES == 16
  a = SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#elif LANES == 8
  a = SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
#else
  a = SHUFFLE(v, 2, 3, 0, 1);
  v = is_max ? vmax(v, a) : v + a;
  a = SHUFFLE(v, 1, 0, 3, 2);
#endif
  return is_max ? vmax(v, a) : v + a;
}
__attribute__((always_inline)) inline float hmax(vf v) { return fold(v, true)[0]; }
__attribute__((always_inline)) inline float hsum(vf v) { return fold(v, false)[0]; }

// exp(x) for x <= 0 (and -inf) as 2^t, t = x log2 e: 2^n by the exponent bits times 2^f, f = t - n in
// [-1/2, 1/2], by the degree-6 polynomial of Cephes exp2f (~1 ulp). The rounding of t costs up to
// |x| * 6e-8 relative, i.e. at most 2.2e-8 of the block's largest term (e^x |x| <= 1/e): below what
// a float sum of the block keeps.
__attribute__((always_inline)) inline vf exp_nonpositive(vf x) {
#ifdef __AVX512F__
  // the same polynomial in four fewer instructions: round and scale by 2^n in one instruction each; t is
  // clamped at -125 (2^-125: no denormal), so a term below e^-86.6 is ~1e-38 instead of 0, which no
  // block sum (>= 1: the largest term is exactly 1) can see
  __m512 t = _mm512_mul_ps((__m512)x, _mm512_set1_ps(1.44269504088896341f));
  t = _mm512_max_ps(_mm512_set1_ps(-125.0f), t);     // NaN stays NaN (the second operand)
  __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = (vf)_mm512_sub_ps(t, n);
#else
  vf t = x * 1.44269504088896341f;
  t = t < -127.0f ? splat(-127.0f) : t;               // -inf, deep underflow -> 2^-127 -> +0.0; NaN stays NaN
  const vf magic = splat(12582912.0f);               // 1.5 * 2^23: rounds to the nearest integer
  vf n = (t + magic) - magic;
  vf f = t - n;
#endif
  vf p = splat(1.535336188319500e-4f);                // Cephes exp2f, |f| <= 1/2
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
#ifdef __AVX512F__
  return (vf)_mm512_scalef_ps((__m512)p, n);
#else
  vi bits = (__builtin_convertvector(n, vi) + 127) << 23;  // n = -127 gives +0.0
  return p * (vf)bits;
#endif
}

// natural log of positive normal floats (Cephes logf).
__attribute__((always_inline)) inline vf log_positive(vf x) {
  vi bits = (vi)x;
  vi e = ((bits >> 23) & 0xff) - 126;
  vf m = (vf)((bits & 0x007fffff) | 0x3f000000);     // mantissa in [1/2, 1)
  vi small = m < 0.707106781186547524f;
  e = e + small;                                      // small: -1 (true) added
  m = (small ? m + m : m) - 1.0f;
  vf z = m * m;
  vf y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  vf fe = __builtin_convertvector(e, vf);
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + fe * 0.693359375f;
}

// keyed_random._mix on 32-bit words.
__attribute__((always_inline)) inline uint32_t mix(uint32_t x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}
__attribute__((always_inline)) inline vu mix(vu x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; return x ^ (x >> 16);
}

// keyed_random's item salt, mix(item + 0x5BD1E995), and unit_interval: the top 24 bits, centred, below 1.
__attribute__((always_inline)) inline uint32_t item_hash(int64_t item) { return mix(uint32_t(item) + 0x5BD1E995u); }
constexpr float BELOW_ONE = 0.99999994039535522f;  // keyed_random._BELOW_ONE
__attribute__((always_inline)) inline float unit_interval(uint32_t h) {
  const float u = (float(h >> 8) + 0.5f) * (1.0f / 16777216.0f);
  return u > BELOW_ONE ? BELOW_ONE : u;
}

// Gumbel noise of L (key, item) pairs from key ^ item salt (keyed_random.gumbel).
__attribute__((always_inline)) inline vf gumbel(vu key_xor_salt) {
  vu h = mix(key_xor_salt);
  vf u = (__builtin_convertvector((vi)(h >> 8), vf) + 0.5f) * (1.0f / 16777216.0f);  // unit_interval, L lanes
  u = u > BELOW_ONE ? splat(BELOW_ONE) : u;
  return -log_positive(-log_positive(u));
}

// The maximum of a block of `bs` scores (NaN ignored; -inf for none).
__attribute__((always_inline)) inline float block_max(const float* s, int64_t bs) {
  const int64_t full = bs / L * L;
  vf m0 = splat(NEG_INF), m1 = m0, m2 = m0, m3 = m0;
  int64_t j = 0;
  for (; j + 4 * L <= full; j += 4 * L) {
    m0 = vmax(m0, load(s + j));
    m1 = vmax(m1, load(s + j + L));
    m2 = vmax(m2, load(s + j + 2 * L));
    m3 = vmax(m3, load(s + j + 3 * L));
  }
  for (; j < full; j += L) m0 = vmax(m0, load(s + j));
  if (full < bs) m1 = vmax(m1, load_tail(s + full, bs - full));
  return hmax(vmax(vmax(m0, m1), vmax(m2, m3)));
}

// A block's LSE when its maximum is not finite, as the eager ops: +inf if the maximum is +inf, else (all
// -inf: no candidate) -inf, or NaN if a NaN hid from the maximum.
inline float lse_of_infinite_max(const float* s, int64_t bs, float mx) {
  if (mx == -NEG_INF) return mx;
  for (int64_t j = 0; j < bs; ++j)
    if (s[j] != s[j]) return s[j];
  return mx;
}

// log Σ exp(s_j - mx) + mx over a block whose maximum mx is finite (NaN passes the exp).
__attribute__((always_inline)) inline float block_lse_shifted(const float* s, int64_t bs, float mx) {
  const int64_t full = bs / L * L;
  const vf shift = splat(mx);
  vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{};
  int64_t j = 0;
  for (; j + 4 * L <= full; j += 4 * L) {
    a0 += exp_nonpositive(load(s + j) - shift);
    a1 += exp_nonpositive(load(s + j + L) - shift);
    a2 += exp_nonpositive(load(s + j + 2 * L) - shift);
    a3 += exp_nonpositive(load(s + j + 3 * L) - shift);
  }
  for (; j < full; j += L) a0 += exp_nonpositive(load(s + j) - shift);
  if (full < bs) a1 += exp_nonpositive(load_tail(s + full, bs - full) - shift);
  return std::log(hsum((a0 + a1) + (a2 + a3))) + mx;
}

// Log-sum-exp of one block of `bs` scores, max-shifted per block.
__attribute__((always_inline)) inline float block_lse(const float* s, int64_t bs) {
  const float mx = block_max(s, bs);
  return std::isfinite(mx) ? block_lse_shifted(s, bs, mx) : lse_of_infinite_max(s, bs, mx);
}

// The block LSEs of one query's row of `nblk` blocks. Software-pipelined: the maximum of block k+1 (read
// from L2/L3) is taken while block k's exps run on data already in L1 (faster than block by block;
// the same values: each block's sums are formed exactly as in block_lse).
__attribute__((always_inline)) inline void row_block_lse(const float* s, int64_t nblk, int64_t bs, float* out) {
  if (bs % (4 * L) != 0) {
    for (int64_t k = 0; k < nblk; ++k) out[k] = block_lse(s + k * bs, bs);
    return;
  }
  float mx = block_max(s, bs);
  for (int64_t k = 0; k < nblk; ++k) {
    const float* p = s + k * bs;
    const float* next = s + (k + 1 < nblk ? k + 1 : k) * bs;
    if (!std::isfinite(mx)) {
      out[k] = lse_of_infinite_max(p, bs, mx);
      mx = block_max(next, bs);
      continue;
    }
    const vf shift = splat(mx);
    vf a0 = vf{}, a1 = vf{}, a2 = vf{}, a3 = vf{}, n0 = splat(NEG_INF), n1 = n0, n2 = n0, n3 = n0;
    for (int64_t j = 0; j < bs; j += 4 * L) {
      a0 += exp_nonpositive(load(p + j) - shift);
      a1 += exp_nonpositive(load(p + j + L) - shift);
      n0 = vmax(n0, load(next + j));
      n1 = vmax(n1, load(next + j + L));
      a2 += exp_nonpositive(load(p + j + 2 * L) - shift);
      a3 += exp_nonpositive(load(p + j + 3 * L) - shift);
      n2 = vmax(n2, load(next + j + 2 * L));
      n3 = vmax(n3, load(next + j + 3 * L));
    }
    out[k] = std::log(hsum((a0 + a1) + (a2 + a3))) + mx;
    mx = hmax(vmax(vmax(n0, n1), vmax(n2, n3)));
  }
}

// The first index of sorted[0, n) whose value is >= id (binary search).
inline int64_t first_at_least(const int64_t* sorted, int64_t n, int64_t id) {
  int64_t lo = 0, hi = n;
  while (lo < hi) { int64_t mid = (lo + hi) / 2; if (sorted[mid] < id) lo = mid + 1; else hi = mid; }
  return lo;
}

// Rows without a value, and each query's own positive, to -inf (before anything reads the chunk).
void mask_chunk(float* s, int64_t b, int64_t n, int64_t ld, const uint8_t* filled, const int64_t* row_ids,
                const int64_t* excl_sorted, const int64_t* excl_query, int64_t n_excl) {
  if (filled)
    for (int64_t r = 0; r < n; ++r)
      if (!filled[r])
        for (int64_t q = 0; q < b; ++q) s[q * ld + r] = NEG_INF;
  if (row_ids && n_excl > 0)
    for (int64_t r = 0; r < n; ++r) {
      const int64_t id = row_ids[r];
      for (int64_t x = first_at_least(excl_sorted, n_excl, id); x < n_excl && excl_sorted[x] == id; ++x)
        s[excl_query[x] * ld + r] = NEG_INF;
    }
}

// ---- the fused scan: product and scan in one pass, scores never leave the L1/L2 caches ----
//
// Queries are packed in groups of QW = 2 vectors ([group][d][QW], zero-padded): a lane is a query, so a
// block's maximum, exps and sums are vertical vector ops (no horizontal reductions) and each score is
// q · row summed over k = 0..d-1 in that order by one fused multiply-add per term: its bits depend on
// neither the chunk, the tile nor the lane. The micro-kernel keeps TILE_ROWS x QW accumulators in
// registers (12 x 32 on AVX-512: 24 of the 32 zmm registers; 6 x 16 with 16 registers) and broadcasts
// each row element from memory.
constexpr int QV = 2, QW = QV * L;
#if LANES == 16
constexpr int TILE_ROWS = 12;
#else
constexpr int TILE_ROWS = 6;
#endif

__attribute__((always_inline)) inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
__attribute__((always_inline)) inline bool any_lane(vi c) {
  uint64_t w[L / 2], o = 0;
  std::memcpy(w, &c, sizeof c);
  for (int i = 0; i < L / 2; ++i) o |= w[i];
  return o != 0;
}

// Scores of R rows (row stride ld) against one query group into S [R][QW]; folds them into the running
// maximum mx[QV] (NaN handled by the caller: see block_lse_lanes).
template <int R>
__attribute__((always_inline)) inline void score_tile(const float* qg, const float* e, int64_t ld, int64_t d, float* S,
                                                      vf* mx) {
  vf acc[R][QV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < QV; ++v) acc[r][v] = vf{};
  for (int64_t k = 0; k < d; ++k) {
    vf q[QV];
#pragma GCC unroll 2
    for (int v = 0; v < QV; ++v) q[v] = load(qg + k * QW + v * L);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float x = e[r * ld + k];
#pragma GCC unroll 2
      for (int v = 0; v < QV; ++v) acc[r][v] += q[v] * x;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int v = 0; v < QV; ++v) {
      store(S + r * QW + v * L, acc[r][v]);
      mx[v] = vmax(mx[v], acc[r][v]);
    }
}

// Scores of `rows` rows into S [rows][QW], maximum per lane into mx: full tiles, then the rest in tiles of
// 8, 4, 2 and 1 rows (few template instances keep the first build short; a score's bits do not depend on
// its tile).
inline void score_rows(const float* qg, const float* e, int64_t ld, int64_t d, int64_t rows, float* S, vf* mx) {
  for (int v = 0; v < QV; ++v) mx[v] = splat(NEG_INF);
  int64_t r = 0;
  for (; r + TILE_ROWS <= rows; r += TILE_ROWS) score_tile<TILE_ROWS>(qg, e + r * ld, ld, d, S + r * QW, mx);
  if (TILE_ROWS > 8 && r + 8 <= rows) { score_tile<8>(qg, e + r * ld, ld, d, S + r * QW, mx); r += 8; }
  if (r + 4 <= rows) { score_tile<4>(qg, e + r * ld, ld, d, S + r * QW, mx); r += 4; }
  if (r + 2 <= rows) { score_tile<2>(qg, e + r * ld, ld, d, S + r * QW, mx); r += 2; }
  if (r < rows) score_tile<1>(qg, e + r * ld, ld, d, S + r * QW, mx);
}

// Column `lane` of S [bs][QW] to out [bs] (a new winner's block scores).
inline void copy_lane(const float* S, int64_t bs, int lane, float* out) {
  int64_t j = 0;
#ifdef __AVX512F__
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(QW));
  for (; j + 16 <= bs; j += 16)
    _mm512_storeu_ps(out + j, _mm512_i32gather_ps(rows, S + j * QW + lane, 4));
#endif
  for (; j < bs; ++j) out[j] = S[j * QW + lane];
}

// One lane's block LSE from its column of S, as the eager ops give it: NaN if a score is NaN, else +inf if
// one is +inf, -inf if all are -inf (used only where the lane's running maximum is not finite).
inline float lane_lse_slow(const float* S, int64_t bs, int lane) {
  float mx = NEG_INF;
  bool nan = false;
  for (int64_t j = 0; j < bs; ++j) {
    const float x = S[j * QW + lane];
    if (x != x) nan = true; else if (x > mx) mx = x;
  }
  if (nan) return std::numeric_limits<float>::quiet_NaN();
  if (mx == -NEG_INF || mx == NEG_INF) return mx;
  double sum = 0.0;
  for (int64_t j = 0; j < bs; ++j) sum += std::exp(double(S[j * QW + lane]) - mx);
  return float(std::log(sum)) + mx;
}

// The block LSE of every lane of S [bs][QW] whose maximum is mx (log via log_positive: the sum is >= 1).
inline void block_lse_lanes(const float* S, int64_t bs, const vf* mx, vf* out) {
  for (int v = 0; v < QV; ++v) {
    const vf shift = (mx[v] - mx[v]) == 0.0f ? mx[v] : splat(0.0f);  // 0 where mx is not finite (redone below)
    vf a0 = vf{}, a1 = vf{};
    int64_t j = 0;
    for (; j + 2 <= bs; j += 2) {
      a0 += exp_nonpositive(load(S + j * QW + v * L) - shift);
      a1 += exp_nonpositive(load(S + (j + 1) * QW + v * L) - shift);
    }
    if (j < bs) a0 += exp_nonpositive(load(S + j * QW + v * L) - shift);
    const vf sum = a0 + a1;
    vf lse = log_positive(sum) + shift;
    lse = sum != sum ? sum : lse;                     // a NaN score: NaN, as the exps give
    for (int i = 0; i < L; ++i)
      if (!std::isfinite(mx[v][i])) lse[i] = lane_lse_slow(S, bs, v * L + i);
    out[v] = lse;
  }
}


// Hints `count` cache lines of p starting at line `first` (of `lines`) into the caches.
inline void prefetch_lines(const float* p, int64_t first, int64_t count, int64_t lines) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t i = first, e = first + count < lines ? first + count : lines; i < e; ++i) __builtin_prefetch(c + i * 64, 0, 3);
}

// Per-lane maximum of S [bs][QW] (after masking).
inline void max_of_tile(const float* S, int64_t bs, vf* mx) {
  for (int v = 0; v < QV; ++v) mx[v] = splat(NEG_INF);
  for (int64_t j = 0; j < bs; ++j)
    for (int v = 0; v < QV; ++v) mx[v] = vmax(mx[v], load(S + j * QW + v * L));
}

// What the fused scans need to know per block (tile) of a chunk, found once per call: its item salt, whether
// it has empty rows, and its (row, query) exclusions (rows ascending). The last block may be short (top-k
// tiles; sampling blocks always divide the chunk).
struct ChunkIndex {
  int64_t n, bs, nblk;
  const uint8_t* filled;
  std::vector<uint32_t> salt;
  std::vector<uint8_t> has_empty;
  std::vector<int64_t> excl_begin, excl_row, excl_q;

  ChunkIndex(int64_t n_, int64_t bs_, int64_t first_block, const uint8_t* filled_, const int64_t* row_ids,
             const int64_t* excl_sorted, const int64_t* excl_query, int64_t n_excl)
      : n(n_), bs(bs_), nblk((n_ + bs_ - 1) / bs_), filled(filled_), salt(nblk), has_empty(nblk, 0),
        excl_begin(nblk + 1, 0) {
    for (int64_t k = 0; k < nblk; ++k) {
      salt[k] = item_hash(first_block + k);
      if (filled)
        for (int64_t j = k * bs; j < k * bs + rows_in(k); ++j) has_empty[k] |= !filled[j];
      if (row_ids && n_excl > 0)
        for (int64_t r = k * bs; r < k * bs + rows_in(k); ++r)
          for (int64_t x = first_at_least(excl_sorted, n_excl, row_ids[r]); x < n_excl && excl_sorted[x] == row_ids[r];
               ++x) {
            excl_row.push_back(r);
            excl_q.push_back(excl_query[x]);
          }
      excl_begin[k + 1] = int64_t(excl_row.size());
    }
  }

  int64_t rows_in(int64_t k) const { return n - k * bs < bs ? n - k * bs : bs; }

  // -inf into the tile S of block k and query group g where a row is empty or holds a lane's own positive;
  // true when anything was masked (the tile's maximum must then be taken again).
  bool mask_tile(float* S, int64_t k, int64_t g) const {
    bool masked = has_empty[k];
    if (masked)
      for (int64_t j = 0; j < rows_in(k); ++j)
        if (!filled[k * bs + j])
          for (int v = 0; v < QV; ++v) store(S + j * QW + v * L, splat(NEG_INF));
    for (int64_t x = excl_begin[k]; x < excl_begin[k + 1]; ++x)
      if (excl_q[x] >= g * QW && excl_q[x] < (g + 1) * QW) {
        S[(excl_row[x] - k * bs) * QW + (excl_q[x] - g * QW)] = NEG_INF;
        masked = true;
      }
    return masked;
  }
};

// Top-k order: a lower value is worse, and among equal values the higher row (the tie rule of top-k mode,
// scoring.top_k_lower_row_wins: the lower global row wins, whatever the sharding).
inline bool worse(float v1, int64_t r1, float v2, int64_t r2) { return v1 < v2 || (v1 == v2 && r1 > r2); }

// A binary heap of k (value, row) pairs with the worst at the root: restores the heap below j.
inline void heap_sift_down(float* v, int64_t* r, int64_t k, int64_t j) {
  for (;;) {
    int64_t c = 2 * j + 1;
    if (c >= k) return;
    if (c + 1 < k && worse(v[c + 1], r[c + 1], v[c], r[c])) ++c;
    if (!worse(v[c], r[c], v[j], r[j])) return;
    std::swap(v[c], v[j]);
    std::swap(r[c], r[j]);
    j = c;
  }
}

// (x, row) replaces the heap's worst pair when its value is strictly greater. Rows are offered in increasing
// order, so an equal value is of a higher row than every row held, and loses the tie.
inline void heap_offer(float* v, int64_t* r, int64_t k, float x, int64_t row) {
  if (!(x > v[0])) return;
  v[0] = x;
  r[0] = row;
  heap_sift_down(v, r, k, 0);
}

// How the fused scans share a chunk among threads: with at least as many query groups as threads, `parts`
// contiguous ranges of groups, each meeting every block; with fewer, each group alone, its blocks split into
// `ranges` consecutive ranges (scanned apart, then merged in block order). Item w is (part w / ranges,
// range w % ranges).
struct WorkSplit {
  int64_t groups, nblk, ranges, parts;

  WorkSplit(int64_t groups_, int64_t nblk_, int64_t nthreads)
      : groups(groups_), nblk(nblk_),
        ranges(groups_ >= nthreads ? 1 : std::max<int64_t>(1, std::min<int64_t>(nblk_, (nthreads + groups_ - 1) / groups_))),
        parts(ranges == 1 ? std::max<int64_t>(1, std::min<int64_t>(groups_, nthreads)) : groups_) {}

  int64_t items() const { return parts * ranges; }
  int64_t g0(int64_t w) const { return groups * (w / ranges) / parts; }
  int64_t g1(int64_t w) const { return groups * (w / ranges + 1) / parts; }
  int64_t range(int64_t w) const { return w % ranges; }
  int64_t k0(int64_t w) const { return nblk * range(w) / ranges; }
  int64_t k1(int64_t w) const { return nblk * (range(w) + 1) / ranges; }
};

// The running top-k of one thread's query groups [g0, g1): per real lane a binary min-heap of k (value, row)
// whose root, the k-th best value, is the lane's threshold (kept lane-major in `floor` for one vector compare
// per row). A score enters only when strictly above it: rows come in increasing order, so an equal score
// is of a higher row, which loses the tie (see worse). NaN never
// enters (no finite score compares below it; the handler refuses non-finite queries before scoring).
struct GroupTopK {
  int64_t g0, g1, b, k;
  std::vector<float> val, floor;
  std::vector<int64_t> row;

  GroupTopK(int64_t g0_, int64_t g1_, int64_t b_, int64_t k_, const float* best_val, const int64_t* best_row)
      : g0(g0_), g1(g1_), b(b_), k(k_), val((g1_ - g0_) * QW * k_), floor((g1_ - g0_) * QW, -NEG_INF),
        row((g1_ - g0_) * QW * k_) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < QW && g * QW + i < b; ++i) {
        const int64_t lane = (g - g0) * QW + i, q = g * QW + i;
        for (int64_t j = 0; j < k; ++j) { val[lane * k + j] = best_val[q * k + j]; row[lane * k + j] = best_row[q * k + j]; }
        for (int64_t j = k / 2 - 1; j >= 0; --j) heap_sift_down(val.data() + lane * k, row.data() + lane * k, k, j);
        floor[lane] = val[lane * k];
      }
  }

  // Offers the rows of tile S [rows][QW] (group g; row j is global row first_row + j).
  void offer(int64_t g, const float* S, int64_t rows, int64_t first_row) {
    float* fl = floor.data() + (g - g0) * QW;
    for (int64_t j = 0; j < rows; ++j)
      for (int v = 0; v < QV; ++v) {
        const vf x = load(S + j * QW + v * L);
        if (!any_lane(x > load(fl + v * L))) continue;
        for (int i = 0; i < L; ++i) {
          const int64_t lane = (g - g0) * QW + v * L + i;
          if (!(x[i] > fl[v * L + i])) continue;
          heap_offer(val.data() + lane * k, row.data() + lane * k, k, x[i], first_row + j);
          fl[v * L + i] = val[lane * k];
        }
      }
  }

  void write_back(float* best_val, int64_t* best_row) const {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t i = 0; i < QW && g * QW + i < b; ++i) {
        const int64_t lane = (g - g0) * QW + i, q = g * QW + i;
        for (int64_t j = 0; j < k; ++j) { best_val[q * k + j] = val[lane * k + j]; best_row[q * k + j] = row[lane * k + j]; }
      }
  }
};

// Stage 1 for one thread's query groups [g0, g1): each (query, draw)'s key and running best, lane-major so
// that a block's offer is one vector compare per QW / L lanes (padding lanes never win: best +inf).
struct GroupDraws {
  int64_t g0, g1, b, m;
  std::vector<uint32_t> key;
  std::vector<float> best;

  GroupDraws(int64_t g0_, int64_t g1_, int64_t b_, int64_t m_, const int64_t* keys, const float* best_key)
      : g0(g0_), g1(g1_), b(b_), m(m_), key((g1_ - g0_) * m_ * QW, 0), best((g1_ - g0_) * m_ * QW, -NEG_INF) {
    for_each_lane([&](int64_t at, int64_t p) { key[at] = uint32_t(keys[p]); best[at] = best_key[p]; });
  }

  // f(index in key/best, index q * m + t in the [b, m] arrays) for every real lane of my groups.
  template <class F> void for_each_lane(F f) const {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t t = 0; t < m; ++t)
        for (int64_t i = 0; i < QW && g * QW + i < b; ++i) f(((g - g0) * m + t) * QW + i, (g * QW + i) * m + t);
  }

  // Offers block k (LSEs `lse` of group g's lanes, scores in S) to every draw: a strictly better key makes
  // it the winner (row `first_row`; its column of S and its LSE copied when win_scores is set). Returns
  // how many winners improved.
  int64_t offer(int64_t g, int64_t k, uint32_t salt, const vf* lse, const float* S, int64_t bs, int64_t first_row,
                int64_t* best_row, float* win_scores, float* win_lse) {
    int64_t improved = 0;
    for (int64_t t = 0; t < m; ++t) {
      const uint32_t* kt = key.data() + ((g - g0) * m + t) * QW;
      float* bt = best.data() + ((g - g0) * m + t) * QW;
      for (int v = 0; v < QV; ++v) {
        vu kv;
        std::memcpy(&kv, kt + v * L, sizeof kv);
        const vf candidate = lse[v] + gumbel(kv ^ salt);
        if (!any_lane(candidate > load(bt + v * L))) continue;  // no lane improved (the common case)
        for (int i = 0; i < L; ++i) {
          if (!(candidate[i] > bt[v * L + i])) continue;
          const int64_t lane = v * L + i, p = (g * QW + lane) * m + t;
          bt[lane] = candidate[i];
          best_row[p] = first_row;
          if (win_scores) {
            copy_lane(S, bs, lane, win_scores + p * bs);
            win_lse[p] = lse[v][i];
          }
          ++improved;
        }
      }
    }
    return improved;
  }

  void write_back(float* best_key) const {
    for_each_lane([&](int64_t at, int64_t p) { best_key[p] = best[at]; });
  }
};

// Work item w of a fused scan: scores each (query group, block) of the item into a per-thread tile S
// [rows][QW], masked (empty rows, own positives), with its per-lane maximum, and hands it to
// visit(g, k, S, mx). The next block is prefetched in shares spread over the item's groups.
template <class Visit>
void scan_tiles(const WorkSplit& split, int64_t w, const ChunkIndex& index, const float* qp, int64_t d,
                const float* rows, int64_t ld, Visit visit) {
  const int64_t g0 = split.g0(w), g1 = split.g1(w), k1 = split.k1(w), bs = index.bs;
  std::vector<float> tile(bs * QW);
  float* S = tile.data();
  for (int64_t k = split.k0(w); k < k1; ++k) {
    const float* block = rows + k * bs * ld;
    const int64_t next_lines = k + 1 < k1 ? index.rows_in(k + 1) * ld * int64_t(sizeof(float)) / 64 : 0;
    const int64_t share = (next_lines + (g1 - g0) - 1) / (g1 - g0);
    for (int64_t g = g0; g < g1; ++g) {
      prefetch_lines(block + bs * ld, (g - g0) * share, share, next_lines);
      vf mx[QV];
      score_rows(qp + g * d * QW, block, ld, d, index.rows_in(k), S, mx);
      if (index.mask_tile(S, k, g)) max_of_tile(S, index.rows_in(k), mx);
      visit(g, k, S, mx);
    }
  }
}

// Stage-1 results of the block ranges after the first (negcache_fused_scan with fewer query groups than
// threads): per range r >= 1 and (query, draw) pair, the best key (-inf: none), its first row, its LSE and
// block scores; merged into the first range's results in range order.
struct SideDraws {
  int64_t pairs, bs;
  std::vector<float> best, win_lse, win;
  std::vector<int64_t> rows;

  SideDraws(int64_t ranges, int64_t pairs_, int64_t bs_, bool copies)
      : pairs(pairs_), bs(bs_), best(ranges * pairs_, NEG_INF), win_lse(ranges * pairs_),
        win(copies ? ranges * pairs_ * bs_ : 0), rows(ranges * pairs_, -1) {}

  float* key(int64_t r) { return best.data() + (r - 1) * pairs; }
  int64_t* row(int64_t r) { return rows.data() + (r - 1) * pairs; }
  float* lse(int64_t r) { return win_lse.data() + (r - 1) * pairs; }
  float* scores(int64_t r) { return win.empty() ? nullptr : win.data() + (r - 1) * pairs * bs; }

  // Range r's winners where strictly better than the ones so far; returns how many were.
  int64_t merge(int64_t r, float* best_key, int64_t* best_row, float* win_scores, float* win_lse_out) {
    int64_t taken = 0;
    for (int64_t p = 0; p < pairs; ++p) {
      if (!(key(r)[p] > best_key[p])) continue;
      best_key[p] = key(r)[p];
      best_row[p] = row(r)[p];
      if (win_scores) {
        std::memcpy(win_scores + p * bs, scores(r) + p * bs, bs * sizeof(float));
        win_lse_out[p] = lse(r)[p];
      }
      ++taken;
    }
    return taken;
  }
};

}  // namespace

extern "C" {

// Scans one chunk `s` [b, n] (row stride ld; n a multiple of bs) in place:
//   * masks rows with filled[r] == 0 and (query, row) pairs whose row id equals the query's excluded id
//     (excl_sorted ascending, excl_query the query of each; either may be null / empty);
//   * writes the block LSEs to lse_out[q * ld_lse + k];
//   * when m > 0, stage 1: for each (q, t), key = lse + Gumbel(keys[q*m+t], first_block + k); a block
//     strictly better than best_key[q*m+t] becomes the winner: best_key, best_row = row0 + k * bs, and
//     (when win_scores is not null) its bs scores and LSE are copied to win_scores[(q*m+t)*bs ...] and
//     win_lse[q*m+t]. Ties keep the lower block, as keyed_random order dictates.
// Returns the number of (query, draw) winners this chunk changed.
int64_t negcache_scan_chunk(float* s, int64_t b, int64_t n, int64_t ld, int64_t bs, const uint8_t* filled,
                            const int64_t* row_ids, const int64_t* excl_sorted, const int64_t* excl_query,
                            int64_t n_excl, float* lse_out, int64_t ld_lse, const int64_t* keys, int64_t m,
                            int64_t first_block, float* best_key, int64_t* best_row, int64_t row0,
                            float* win_scores, float* win_lse, int nthreads) {
  mask_chunk(s, b, n, ld, filled, row_ids, excl_sorted, excl_query, n_excl);
  const int64_t nblk = n / bs;
  const int64_t padded = (nblk + L - 1) / L * L;
  std::vector<uint32_t> salts(padded > 0 ? padded : 1);  // each block's item salt, once per chunk
  for (int64_t k = 0; k < padded; ++k) salts[k] = item_hash(first_block + k);
  int64_t changed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : changed) if (nthreads > 1)
  for (int64_t q = 0; q < b; ++q) {
    float* lse = lse_out + q * ld_lse;
    const float* sq = s + q * ld;
    row_block_lse(sq, nblk, bs, lse);
    for (int64_t t = 0; t < m; ++t) {
      const uint32_t key = uint32_t(keys[q * m + t]);
      float best = best_key[q * m + t];
      int64_t win = -1;
      for (int64_t k0 = 0; k0 < nblk; k0 += L) {
        vu ih;
        std::memcpy(&ih, salts.data() + k0, sizeof ih);
        vf g = gumbel(ih ^ key);
        const int64_t lanes = nblk - k0 < L ? nblk - k0 : L;
        for (int64_t i = 0; i < lanes; ++i) {
          const float v = lse[k0 + i] + g[i];
          if (v > best) { best = v; win = k0 + i; }
        }
      }
      if (win >= 0) {
        ++changed;
        best_key[q * m + t] = best;
        best_row[q * m + t] = row0 + win * bs;
        if (win_scores) {
          std::memcpy(win_scores + (q * m + t) * bs, sq + win * bs, bs * sizeof(float));
          win_lse[q * m + t] = lse[win];
        }
      }
    }
  }
  return changed;
}

// The fused scan of one chunk of rows `rows` [n, d] (row stride ld; n a multiple of bs) against the packed
// query groups `qp` (negcache_pack_queries: ceil(b / QW) groups of [d][QW]). Does what
// negcache_scan_chunk does on a score chunk (masks, block LSEs into lse_out[q * ld_lse + k], stage 1
// with ties to the lower block, copies of each new winner's block scores and LSE), without a score
// chunk: each (query group, block) is scored into a per-thread [bs][QW] tile, reduced and offered to
// stage 1 while it is in L1.
// Work is split so that every thread has some: with at least as many query groups as threads, each thread
// owns a range of groups and meets all blocks in increasing order; with fewer groups, each group's blocks
// are split into consecutive ranges, the ranges after the first scanned into side buffers of their own
// and merged in block order afterwards (strictly better only: ties keep the lower block, as a single pass
// would). Returns how many times a winner improved.
int64_t negcache_fused_scan(const float* qp, int64_t b, int64_t d, const float* rows, int64_t n, int64_t ld,
                            int64_t bs, const uint8_t* filled, const int64_t* row_ids, const int64_t* excl_sorted,
                            const int64_t* excl_query, int64_t n_excl, float* lse_out, int64_t ld_lse,
                            const int64_t* keys, int64_t m, int64_t first_block, float* best_key, int64_t* best_row,
                            int64_t row0, float* win_scores, float* win_lse, int nthreads) {
  const int64_t nblk = n / bs, groups = (b + QW - 1) / QW;
  const ChunkIndex index(n, bs, first_block, filled, row_ids, excl_sorted, excl_query, n_excl);
  const WorkSplit split(groups, nblk, nthreads);
  SideDraws side(split.ranges - 1, b * m, bs, win_scores != nullptr);
  int64_t changed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : changed) if (nthreads > 1 && split.items() > 1)
  for (int64_t w = 0; w < split.items(); ++w) {
    const int64_t r = split.range(w);
    GroupDraws draws(split.g0(w), split.g1(w), b, m, keys, r ? side.key(r) : best_key);
    float* ws = r ? side.scores(r) : win_scores;
    float* wl = r ? side.lse(r) : win_lse;
    int64_t* br = r ? side.row(r) : best_row;
    scan_tiles(split, w, index, qp, d, rows, ld, [&](int64_t g, int64_t k, const float* S, const vf* mx) {
      vf lse[QV];
      block_lse_lanes(S, bs, mx, lse);
      for (int v = 0; v < QV; ++v)
        for (int i = 0; i < L && g * QW + v * L + i < b; ++i) lse_out[(g * QW + v * L + i) * ld_lse + k] = lse[v][i];
      changed += draws.offer(g, k, index.salt[k], lse, S, bs, row0 + k * bs, br, ws, wl);
    });
    draws.write_back(r ? side.key(r) : best_key);
  }
  for (int64_t r = 1; r < split.ranges; ++r) changed += side.merge(r, best_key, best_row, win_scores, win_lse);
  return changed;
}

// The running top-k of the b queries of `qp` over the rows [n, d] of one chunk (row stride ld), scored tile by
// tile as in negcache_fused_scan (tiles of `tile` rows; the last may be short), with the same masks.
// best_val / best_row [b, k] hold the top-k of earlier chunks (-inf / -1 where empty) on entry and after it
// (in heap order; the caller sorts); rows are recorded as row0 + local row. Work is split as in
// negcache_fused_scan (WorkSplit); the tile ranges after the first fill heaps of their own, whose entries
// are then offered to the first range's heaps in row order, so ties keep the earlier row as in one pass.
void negcache_fused_topk(const float* qp, int64_t b, int64_t d, const float* rows, int64_t n, int64_t ld, int64_t tile,
                         const uint8_t* filled, const int64_t* row_ids, const int64_t* excl_sorted,
                         const int64_t* excl_query, int64_t n_excl, int64_t k, float* best_val, int64_t* best_row,
                         int64_t row0, int nthreads) {
  const int64_t groups = (b + QW - 1) / QW;
  const ChunkIndex index(n, tile, 0, filled, row_ids, excl_sorted, excl_query, n_excl);
  const WorkSplit split(groups, index.nblk, nthreads);
  // ranges after the first start from empty heaps of their own
  std::vector<float> side_val((split.ranges - 1) * b * k, NEG_INF);
  std::vector<int64_t> side_row((split.ranges - 1) * b * k, -1);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && split.items() > 1)
  for (int64_t w = 0; w < split.items(); ++w) {
    const int64_t r = split.range(w);
    float* vals = r ? side_val.data() + (r - 1) * b * k : best_val;
    int64_t* rws = r ? side_row.data() + (r - 1) * b * k : best_row;
    GroupTopK top(split.g0(w), split.g1(w), b, k, vals, rws);
    scan_tiles(split, w, index, qp, d, rows, ld, [&](int64_t g, int64_t t, const float* S, const vf*) {
      top.offer(g, S, index.rows_in(t), row0 + t * tile);
    });
    top.write_back(vals, rws);
  }
  // later ranges' candidates offered in row order, as a single pass would have met them
  std::vector<std::pair<int64_t, float>> cand;
  for (int64_t r = 1; r < split.ranges; ++r)
    for (int64_t q = 0; q < b; ++q) {
      cand.clear();
      for (int64_t j = 0; j < k; ++j) {
        const int64_t at = ((r - 1) * b + q) * k + j;
        if (side_row[at] >= 0) cand.emplace_back(side_row[at], side_val[at]);
      }
      std::sort(cand.begin(), cand.end());
      for (const auto& [row, val] : cand) heap_offer(best_val + q * k, best_row + q * k, k, val, row);
    }
}

// Packs queries q [b, d] into ceil(b / QW) groups of [d][QW] (lane = query; padding lanes 0) for
// negcache_fused_scan; returns the number of floats written.
int64_t negcache_pack_queries(const float* q, int64_t b, int64_t d, float* out) {
  const int64_t groups = (b + QW - 1) / QW;
  std::memset(out, 0, sizeof(float) * groups * d * QW);
  for (int64_t i = 0; i < b; ++i)
    for (int64_t k = 0; k < d; ++k) out[(i / QW) * d * QW + k * QW + i % QW] = q[i * d + k];
  return groups * d * QW;
}

// The exclusions' values as the scans need them, checked in one pass before any scan reads them: 0 when every
// excl_query is a query index in [0, b) and excl_sorted is ascending; 1 when a query index is out of range (the
// mask would write outside the chunk); 2 when excl_sorted is not ascending (the binary search would miss ids).
int64_t negcache_check_exclusions(const int64_t* excl_sorted, const int64_t* excl_query, int64_t n_excl, int64_t b) {
  for (int64_t x = 0; x < n_excl; ++x)
    if (excl_query[x] < 0 || excl_query[x] >= b) return 1;
  for (int64_t x = 1; x < n_excl; ++x)
    if (excl_sorted[x] < excl_sorted[x - 1]) return 2;
  return 0;
}

// Queries per group of the packed layout.
int64_t negcache_query_group() { return QW; }

// The code path this build compiled: the vector width it was written for.
const char* negcache_variant() {
#if LANES == 16
  return "avx512: 16 float lanes";
#elif LANES == 8
  return "avx: 8 float lanes";
#else
  return "generic: 4 float lanes";
#endif
}

// The build's identity (native_scan.py passes -DNEGCACHE_BUILD_ID, a digest of the source, flags, compiler
// and CPU): checked after loading, so a stale or foreign library under the kernel's name is never called.
uint64_t negcache_build_id() { return NEGCACHE_BUILD_ID; }

// Stage 2 for the final winners: for each pair p whose best_key is finite, the row inside its block drawn
// with probability exp(a_j - lse) by inverse CDF at u[p] (scoring.pick_in_block), added with row_offset
// to best_row[p] (the block's first local row: the result is the global row; -1 where nothing was found):
// the first row whose cumulative weight exceeds u * total, never past the first row where it reaches the
// total (the last row with mass). The CDF is summed in double as (16-row groups before) + (rows of the
// group so far): the group sums are independent chains, and the CDF ends exactly at the total.
void negcache_pick(const float* win_scores, const float* win_lse, const float* u, const float* best_key,
                   int64_t pairs, int64_t bs, int64_t* best_row, int64_t row_offset, int nthreads) {
  const int64_t groups = (bs + L - 1) / L;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    std::vector<float> w(groups * L);  // per thread, on the heap: a block may have many rows
    std::vector<double> group_sum(groups);
#pragma omp for schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
      if (!std::isfinite(best_key[p])) { best_row[p] = -1; continue; }
      const float* s = win_scores + p * bs;
      const vf shift = splat(win_lse[p]);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t j = g * L;
        vf x = bs - j >= L ? load(s + j) : load_tail(s + j, bs - j);
        vf e = exp_nonpositive(x - shift);
        e = x == NEG_INF ? splat(0.0f) : e;  // a masked row has no mass (the AVX-512 exp leaves ~1e-38)
        std::memcpy(w.data() + j, &e, sizeof e);
        double sum = 0.0;
        for (int i = 0; i < L; ++i) sum += w[j + i];
        group_sum[g] = sum;
      }
      double total = 0.0;
      for (int64_t g = 0; g < groups; ++g) total += group_sum[g];
      const double target = double(u[p]) * total;
      int64_t within = -1, last = bs - 1;
      double before = 0.0;
      for (int64_t g = 0; g < groups; ++g) {
        const double end = before + group_sum[g];
        if ((within < 0 && end > target) || end >= total) {
          double partial = 0.0;
          for (int64_t i = 0; i < L && g * L + i < bs; ++i) {
            partial += w[g * L + i];
            if (within < 0 && before + partial > target) within = g * L + i;
            if (before + partial >= total) { last = g * L + i; break; }
          }
          if (before + partial >= total) break;
        }
        before = end;
      }
      best_row[p] += row_offset + ((within >= 0 && within < last) ? within : last);
    }
  }
}

// Log-sum-exp of each row of x [rows, n] (the step's block LSEs -> each query's LSE over this shard).
void negcache_row_lse(const float* x, int64_t rows, int64_t n, float* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
  for (int64_t r = 0; r < rows; ++r) out[r] = block_lse(x + r * n, n);
}

// keyed_random.draw_keys for query positions 0..b-1 and draws 0..m-1 of the streams whose bases are
// `key_base` (-> keys [b, m], int64 holding 32-bit words) and `uniform_base` (-> uniforms [b, m], as
// keyed_random.uniform of those keys). Bit-identical to the torch ops.
void negcache_draws(uint32_t key_base, uint32_t uniform_base, int64_t b, int64_t m, int64_t* keys, float* u) {
  for (int64_t q = 0; q < b; ++q) {
    const uint32_t qk = mix(uint32_t(q) ^ key_base), qu = mix(uint32_t(q) ^ uniform_base);
    for (int64_t t = 0; t < m; ++t) {
      const uint32_t d = mix(uint32_t(t) + 0x68E31DA4u);
      keys[q * m + t] = mix(qk ^ d);
      const uint32_t h = mix(mix(qu ^ d) + 0x1B56C4E9u);
      u[q * m + t] = unit_interval(h);
    }
  }
}

// Gumbel noise [n_keys, n_items] of keys crossed with 32-bit item ids (keyed_random.gumbel), for tests.
void negcache_gumbel(const int64_t* keys, int64_t n_keys, const int64_t* items, int64_t n_items, float* out) {
  for (int64_t i = 0; i < n_keys; ++i)
    for (int64_t k0 = 0; k0 < n_items; k0 += L) {
      vu ih = vu{};
      const int64_t lanes = n_items - k0 < L ? n_items - k0 : L;
      for (int64_t j = 0; j < lanes; ++j) ih[j] = item_hash(items[k0 + j]);
      vf g = gumbel(ih ^ uint32_t(keys[i]));
      for (int64_t j = 0; j < lanes; ++j) out[i * n_items + k0 + j] = g[j];
    }
}

// exp(x) for x <= 0, elementwise (for tests of the polynomial).
void negcache_exp_nonpositive(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += L) {
    vf v = splat(0.0f);
    const int64_t lanes = n - i < L ? n - i : L;
    for (int64_t j = 0; j < lanes; ++j) v[j] = x[i + j];
    vf r = exp_nonpositive(v);
    for (int64_t j = 0; j < lanes; ++j) out[i + j] = r[j];
  }
}

}  // extern "C"
