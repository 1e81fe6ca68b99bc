// AVX-512 inner loops (F, BW, VL, DQ, BF16, VNNI, VBMI: Intel Cooper Lake / Sapphire Rapids and
// later, AMD Zen 4 and later). Compiled for that target whatever the build flags, and only
// entered after a run-time CPU check (avx512_supported).
#include "kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,avx512vbmi,fma,f16c")

#include "prep.h"

namespace zaya_kernels {
namespace {

struct Avx512Isa {
  static float quantize32(const float* x, int8_t* q) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    const __m512 vid = _mm512_set1_ps(id), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    // cvtps rounds with the default mode: to nearest, ties to even (as std::nearbyint)
    const __m512i qa = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(a, vid))));
    const __m512i qb = _mm512_cvtps_epi32(_mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_mul_ps(b, vid))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(qb));
    return d;
  }
  static void permute8(uint16_t* v, int64_t n, const int* order) {  // n is a multiple of 32
    alignas(64) uint16_t idx[32];
    for (int i = 0; i < 32; ++i) idx[i] = static_cast<uint16_t>((i & ~7) + order[i & 7]);
    const __m512i vi = _mm512_load_si512(idx);
    for (int64_t i = 0; i < n; i += 32)
      _mm512_storeu_si512(v + i, _mm512_permutexvar_epi16(vi, _mm512_loadu_si512(v + i)));
  }
  static void permute8(int8_t* v, int64_t n, const int* order) {  // n is a multiple of 32
    alignas(64) uint8_t idx[64];
    for (int i = 0; i < 64; ++i) idx[i] = static_cast<uint8_t>((i & ~7) + order[i & 7]);
    const __m512i vi = _mm512_load_si512(idx);
    int64_t i = 0;
    for (; i + 64 <= n; i += 64)
      _mm512_storeu_si512(v + i, _mm512_permutexvar_epi8(vi, _mm512_loadu_si512(v + i)));
    if (i < n) {
      const __mmask64 m = 0xffffffffull;
      _mm512_mask_storeu_epi8(v + i, m, _mm512_permutexvar_epi8(vi, _mm512_maskz_loadu_epi8(m, v + i)));
    }
  }
};

// Value tables held in registers for the whole call.
struct Tables {
  __m512 lut_f32;                // 4-bit values, fp32 (vpermps reads the low 4 bits of an index)
  __m512i lut_bf16;              // 4-bit values, bf16, twice (vpermw reads the low 5 bits)
  __m512i lut_u8;                // 4-bit values + offset as bytes, in every 128-bit lane (vpshufb)
  __m512i fp8_hi0, fp8_hi1;      // e4m3 magnitude (7 bits) -> high byte of its bf16
  __m512i fp8_lo0, fp8_lo1;      // ... and low byte
  __m512i int8_top[4];           // vpshufb controls: byte j of each 32-bit lane to its top byte, zeros below
};

typedef int32_t aliased_i32 __attribute__((may_alias));
typedef float aliased_f32 __attribute__((may_alias));

// broadcasts written as plain dereferences, so the compiler folds them into the arithmetic
// instruction's memory operand ({1to16})
inline __m512 bcast_f32(const void* p) { return _mm512_set1_ps(*static_cast<const aliased_f32*>(p)); }
inline __m512i bcast_u32(const void* p) { return _mm512_set1_epi32(*static_cast<const aliased_i32*>(p)); }
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// bf16 pairs (k, k+1 in each 32-bit lane) -> two fp32 vectors
inline void split_pairs(__m512i v, __m512* f) {
  f[0] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  f[1] = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

struct DecBF16 {
  static constexpr int kpu = 2, nA = 2, nB = 1, nC = 0;
  static void a(const uint8_t* u, const Tables&, __m512* f) { split_pairs(_mm512_loadu_si512(u), f); }
  static void b(const uint8_t* u, const Tables&, __m512i* v) { v[0] = _mm512_loadu_si512(u); }
  static void c(const uint8_t*, const Tables&, __m512i*) {}
};

struct DecInt8 {
  static constexpr int kpu = 4, nA = 4, nB = 0, nC = 1;
  static void a(const uint8_t* u, const Tables&, __m512* f) {
    const __m512i v = _mm512_loadu_si512(u);
    for (int j = 0; j < 4; ++j) f[j] = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * j), 24));
  }
  static void b(const uint8_t*, const Tables&, __m512i*) {}
  // s8 -> u8 by flipping the sign bit: the kernel sees w + 128 and the activation side subtracts
  // 128 * sum(x) (folded into the accumulator's starting value)
  static void c(const uint8_t* u, const Tables&, __m512i* q) {
    q[0] = _mm512_xor_si512(_mm512_loadu_si512(u), _mm512_set1_epi8(static_cast<char>(0x80)));
  }
};

// int8 weights for path A when the activations are small (Problem::x_small): byte j moved to the top
// of its 32-bit lane (one vpshufb, zeros below) converts to q * 2^24 exactly, in place of two
// shifts; every product and partial sum is then 2^24 times the plain loop's, rounded alike (fp32
// rounding commutes with powers of two away from overflow and subnormals), and each group's sum is
// multiplied by 2^-24 before its scale.
struct DecInt8Top {
  static constexpr int kpu = 4, nA = 4, nB = 0, nC = 0;
  static constexpr float kPartScale = 0x1p-24f;
  static void a(const uint8_t* u, const Tables& t, __m512* f) {
    const __m512i v = _mm512_loadu_si512(u);
    for (int j = 0; j < 4; ++j) f[j] = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(v, t.int8_top[j]));
  }
  static void b(const uint8_t*, const Tables&, __m512i*) {}
  static void c(const uint8_t*, const Tables&, __m512i*) {}
};

template <class D>
constexpr float part_scale() {
  if constexpr (requires { D::kPartScale; }) {
    return D::kPartScale;
  } else {
    return 1.0f;
  }
}

template <bool kShuffle>
struct DecU4 {
  static constexpr int kpu = 8, nA = 8, nB = 4, nC = 2;
  static void a(const uint8_t* u, const Tables& t, __m512* f) {
    const __m512i v = _mm512_loadu_si512(u);
    for (int j = 0; j < 8; ++j) f[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), t.lut_f32);
  }
  // word 0 of a lane holds nibbles 0-3, word 1 nibbles 4-7: shifting both words by 4s and looking
  // up their low bits gives the bf16 pair (s, s + 4)
  static void b(const uint8_t* u, const Tables& t, __m512i* v) {
    const __m512i x = _mm512_loadu_si512(u);
    for (int s = 0; s < 4; ++s) v[s] = _mm512_permutexvar_epi16(_mm512_srli_epi16(x, 4 * s), t.lut_bf16);
  }
  // low nibbles are k 0, 2, 4, 6 of the lane, high nibbles k 1, 3, 5, 7
  static void c(const uint8_t* u, const Tables& t, __m512i* q) {
    const __m512i x = _mm512_loadu_si512(u);
    const __m512i m = _mm512_set1_epi8(0x0f);
    q[0] = _mm512_and_si512(x, m);
    q[1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m);
    if (kShuffle) {
      q[0] = _mm512_shuffle_epi8(t.lut_u8, q[0]);
      q[1] = _mm512_shuffle_epi8(t.lut_u8, q[1]);
    }
  }
};

struct DecFP8 {
  static constexpr int kpu = 4, nA = 4, nB = 2, nC = 0;
  // two 128-entry byte lookups (vpermi2b) give the high and low bytes of each value's bf16; the
  // sign bit is copied over; the byte interleave yields pairs (k0, k1) and (k2, k3) because the
  // layout stores each 128-bit lane as [4 rows x k0,k1 | 4 rows x k2,k3]
  static void b(const uint8_t* u, const Tables& t, __m512i* v) {
    const __m512i x = _mm512_loadu_si512(u);
    __m512i hi = _mm512_permutex2var_epi8(t.fp8_hi0, x, t.fp8_hi1);
    const __m512i lo = _mm512_permutex2var_epi8(t.fp8_lo0, x, t.fp8_lo1);
    hi = _mm512_ternarylogic_epi32(hi, x, _mm512_set1_epi8(static_cast<char>(0x80)), 0xf8);  // hi | (x & 0x80)
    v[0] = _mm512_unpacklo_epi8(lo, hi);
    v[1] = _mm512_unpackhi_epi8(lo, hi);
  }
  static void a(const uint8_t* u, const Tables& t, __m512* f) {
    __m512i v[2];
    b(u, t, v);
    split_pairs(v[0], f);
    split_pairs(v[1], f + 2);
  }
  static void c(const uint8_t*, const Tables&, __m512i*) {}
};

inline __m512 load_scales(const uint8_t* s, ScaleType t) {
  switch (t) {
    case ScaleType::BF16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s))), 16));
    case ScaleType::F16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
    default:
      return _mm512_loadu_ps(reinterpret_cast<const float*>(s));
  }
}

// Applies group g's scale and min to the group's partial sums and adds them to the row totals.
template <int MC>
inline void finish_group(const Problem& p, const uint8_t* sc, const uint8_t* mn, int64_t g, int64_t row0,
                         const __m512* part, __m512* acc) {
  const int64_t s_size = p.scale_type == ScaleType::F32 ? 4 : 2;
  if (sc) {
    const __m512 s = load_scales(sc + g * kLanes * s_size, p.scale_type);
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_fmadd_ps(part[m], s, acc[m]);
  } else {
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_add_ps(part[m], acc[m]);
  }
  if (mn) {
    const __m512 z = load_scales(mn + g * kLanes * s_size, p.scale_type);
    const float* xs = p.xsum + g * p.rows + row0;
    for (int m = 0; m < MC; ++m) acc[m] = _mm512_fmadd_ps(z, bcast_f32(xs + m), acc[m]);
  }
}

template <int MC>
inline void store(const Problem& p, int64_t nb, int64_t row0, const __m512* acc) {
  alignas(64) float out[MC][kLanes];
  for (int m = 0; m < MC; ++m) _mm512_store_ps(out[m], acc[m]);
  store_tile(p, nb, row0, MC, out);
}

// Where a tile's NT n-blocks start: the first at w / sc / mn, the next nb_bytes / s_bytes on.
struct Blocks {
  const uint8_t* w;
  const uint8_t* sc;
  const uint8_t* mn;
  int64_t nb;        // index of the first n-block
  int64_t nb_bytes;  // weight bytes per n-block
  int64_t s_bytes;   // scale (and min) bytes per n-block
  const uint8_t* scales(int i) const { return sc ? sc + i * s_bytes : nullptr; }
  const uint8_t* mins(int i) const { return mn ? mn + i * s_bytes : nullptr; }
};

// Paths A and B: exact products, fp32 sums per group, then scale (and min).
//
// A tile computes MC rows against NT n-blocks side by side. Each (n-block, row) pair has its own
// accumulator, summed in the same order whatever NT and MC are (units in k order, then the unit's
// vectors), so a row's result does not depend on how many rows or n-blocks share its tile. NT > 1
// is for few rows: one row's sums over one n-block form a single chain of dependent
// vdpbf16ps / FMAs (4 to 8 per unit), bound by their latency; NT independent chains keep the
// vector units busy and the loads of NT weight streams in flight.
template <class D, bool kB, int MC, int NT>
void tile_float(const Problem& p, const Tables& t, const Blocks& bl, int64_t row0) {
  constexpr int V = kB ? D::nB : D::nA;  // activation words (and weight vectors) per unit
  const int64_t units = p.group / D::kpu, xstep = p.rows * V, stride = bl.nb_bytes;
  const uint32_t* x = static_cast<const uint32_t*>(p.x) + row0 * V;
  const uint8_t* w = bl.w;
  __m512 acc[NT][MC], part[NT][MC];
  for (int i = 0; i < NT; ++i)
    for (int m = 0; m < MC; ++m) acc[i][m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ngroups; ++g) {
    for (int i = 0; i < NT; ++i)
      for (int m = 0; m < MC; ++m) part[i][m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; ++u, w += kUnitBytes, x += xstep) {
      for (int i = 0; i < NT; ++i) {
        if constexpr (kB) {
          __m512i v[V];
          D::b(w + i * stride, t, v);
          for (int j = 0; j < V; ++j)
            for (int m = 0; m < MC; ++m)
              part[i][m] = _mm512_dpbf16_ps(part[i][m], as_bh(v[j]), as_bh(bcast_u32(x + m * V + j)));
        } else {
          __m512 f[V];
          D::a(w + i * stride, t, f);
          for (int j = 0; j < V; ++j)
            for (int m = 0; m < MC; ++m) part[i][m] = _mm512_fmadd_ps(f[j], bcast_f32(x + m * V + j), part[i][m]);
        }
      }
    }
    if constexpr (part_scale<D>() != 1.0f) {
      for (int i = 0; i < NT; ++i)
        for (int m = 0; m < MC; ++m) part[i][m] = _mm512_mul_ps(part[i][m], _mm512_set1_ps(part_scale<D>()));
    }
    for (int i = 0; i < NT; ++i) finish_group<MC>(p, bl.scales(i), bl.mins(i), g, row0, part[i], acc[i]);
  }
  for (int i = 0; i < NT; ++i) store<MC>(p, bl.nb + i, row0, acc[i]);
}

// One n-block (NT = 1, the many-row tiles): the same loop written for a single accumulator set,
// which GCC keeps in registers across groups (the general form above spilled the row totals).
template <class D, bool kB, int MC>
void tile_float_one(const Problem& p, const Tables& t, const uint8_t* w, const uint8_t* sc, const uint8_t* mn,
                    int64_t nb, int64_t row0) {
  constexpr int V = kB ? D::nB : D::nA;
  const int64_t units = p.group / D::kpu, xstep = p.rows * V;
  const uint32_t* x = static_cast<const uint32_t*>(p.x) + row0 * V;
  __m512 acc[MC], part[MC];
  for (int m = 0; m < MC; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.ngroups; ++g) {
    for (int m = 0; m < MC; ++m) part[m] = _mm512_setzero_ps();
    for (int64_t u = 0; u < units; ++u, w += kUnitBytes, x += xstep) {
      if constexpr (kB) {
        __m512i v[V];
        D::b(w, t, v);
        for (int j = 0; j < V; ++j)
          for (int m = 0; m < MC; ++m)
            part[m] = _mm512_dpbf16_ps(part[m], as_bh(v[j]), as_bh(bcast_u32(x + m * V + j)));
      } else {
        __m512 f[V];
        D::a(w, t, f);
        for (int j = 0; j < V; ++j)
          for (int m = 0; m < MC; ++m) part[m] = _mm512_fmadd_ps(f[j], bcast_f32(x + m * V + j), part[m]);
      }
    }
    if constexpr (part_scale<D>() != 1.0f) {
      for (int m = 0; m < MC; ++m) part[m] = _mm512_mul_ps(part[m], _mm512_set1_ps(part_scale<D>()));
    }
    finish_group<MC>(p, sc, mn, g, row0, part, acc);
  }
  store<MC>(p, nb, row0, acc);
}

// Path C: u8 weights x s8 activations summed in int32 over a flush block of kFlush k, converted
// with the block's activation scale, summed per group, then the weight scale (and min); NT
// n-blocks side by side as in tile_float.
template <class D, int MC, int kFlush, int NT>
void tile_int(const Problem& p, const Tables& t, const Blocks& bl, int64_t row0) {
  constexpr int Q = D::nC, kUnits = kFlush / D::kpu;
  const int64_t blocks = p.group / kFlush, xstep = p.rows * Q, R = p.rows, stride = bl.nb_bytes;
  const uint32_t* x = static_cast<const uint32_t*>(p.x) + row0 * Q;
  const int32_t* corr = p.xcorr + row0;
  const float* xd = p.xd + row0;
  const uint8_t* w = bl.w;
  __m512 acc[NT][MC], part[NT][MC];
  for (int i = 0; i < NT; ++i)
    for (int m = 0; m < MC; ++m) acc[i][m] = _mm512_setzero_ps();
  for (int64_t g = 0, fb = 0; g < p.ngroups; ++g) {
    for (int i = 0; i < NT; ++i)
      for (int m = 0; m < MC; ++m) part[i][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b, ++fb) {
      __m512i iacc[NT][MC];
      for (int i = 0; i < NT; ++i)
        for (int m = 0; m < MC; ++m) iacc[i][m] = _mm512_set1_epi32(corr[fb * R + m]);
      for (int u = 0; u < kUnits; ++u, w += kUnitBytes, x += xstep) {
        for (int i = 0; i < NT; ++i) {
          __m512i q[Q];
          D::c(w + i * stride, t, q);
          for (int j = 0; j < Q; ++j)
            for (int m = 0; m < MC; ++m)
              iacc[i][m] = _mm512_dpbusd_epi32(iacc[i][m], q[j], bcast_u32(x + m * Q + j));
        }
      }
      const float* d = xd + (fb * kFlush / kActBlock) * R;
      for (int i = 0; i < NT; ++i)
        for (int m = 0; m < MC; ++m)
          part[i][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i][m]), bcast_f32(d + m), part[i][m]);
    }
    for (int i = 0; i < NT; ++i) finish_group<MC>(p, bl.scales(i), bl.mins(i), g, row0, part[i], acc[i]);
  }
  for (int i = 0; i < NT; ++i) store<MC>(p, bl.nb + i, row0, acc[i]);
}

template <class D, Path P, int MC, int NT>
void tile(const Problem& p, const Tables& t, const Blocks& bl, int64_t row0) {
  if constexpr (P == Path::C) {
    if (p.flush == 16) {
      tile_int<D, MC, 16, NT>(p, t, bl, row0);
    } else {
      tile_int<D, MC, 32, NT>(p, t, bl, row0);
    }
  } else {
    if constexpr (NT == 1) {
      tile_float_one<D, P == Path::B, MC>(p, t, bl.w, bl.sc, bl.mn, bl.nb, row0);
    } else {
      tile_float<D, P == Path::B, MC, NT>(p, t, bl, row0);
    }
  }
}

// n-blocks a tile of MC rows takes side by side (kMaxNT at most): enough independent
// accumulator chains (NT * MC) to cover the latency of the multiply-adds.
constexpr int kMaxNT = 4;
constexpr int tile_blocks(int mc) { return mc == 1 ? 4 : mc <= 4 ? 2 : 1; }

// Runs `cnt` (<= kMaxNT) consecutive n-blocks for MC rows: tiles of tile_blocks(MC) n-blocks,
// the remainder one at a time (the same sums either way).
template <class D, Path P, int MC>
void tiles(const Problem& p, const Tables& t, Blocks bl, int64_t row0, int cnt) {
  constexpr int NT = tile_blocks(MC);
  int i = 0;
  for (; i + NT <= cnt; i += NT) {
    tile<D, P, MC, NT>(p, t, bl, row0);
    bl.w += NT * bl.nb_bytes;
    if (bl.sc) bl.sc += NT * bl.s_bytes;
    if (bl.mn) bl.mn += NT * bl.s_bytes;
    bl.nb += NT;
  }
  for (; i < cnt; ++i) {
    tile<D, P, MC, 1>(p, t, bl, row0);
    bl.w += bl.nb_bytes;
    if (bl.sc) bl.sc += bl.s_bytes;
    if (bl.mn) bl.mn += bl.s_bytes;
    bl.nb += 1;
  }
}

// drive() (kernels.h) with kMaxNT n-blocks per step instead of one: n-blocks split across
// threads; inside a thread's range, kMaxNT n-blocks at a time, each expert's rows in chunks of
// at most 8, so the n-blocks are streamed once per expert and reused from cache by later chunks.
template <class D, Path P>
void run(const Problem& p, const Tables& t) {
  const int64_t nb_bytes = p.kp / D::kpu * kUnitBytes;
  const int64_t s_size = p.scale_type == ScaleType::F32 ? 4 : 2, s_bytes = p.ngroups * kLanes * s_size;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / nb_bytes);
  at::parallel_for(0, p.nb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; nb += kMaxNT) {
      const int cnt = static_cast<int>(std::min<int64_t>(kMaxNT, end - nb));
      for (int s = 0; s < p.nseg; ++s) {
        const int64_t e = p.seg_expert[s];
        Blocks bl;
        bl.w = p.w + e * p.w_expert_stride + nb * nb_bytes;
        const int64_t soff = e * p.s_expert_stride * s_size + nb * s_bytes;
        bl.sc = p.scales ? static_cast<const uint8_t*>(p.scales) + soff : nullptr;
        bl.mn = p.mins ? static_cast<const uint8_t*>(p.mins) + soff : nullptr;
        bl.nb = nb;
        bl.nb_bytes = nb_bytes;
        bl.s_bytes = s_bytes;
        for (int64_t r = p.seg_begin[s]; r < p.seg_begin[s + 1];) {
          const int64_t left = p.seg_begin[s + 1] - r;
          const int mc = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
          switch (mc) {
            case 8: tiles<D, P, 8>(p, t, bl, r, cnt); break;
            case 4: tiles<D, P, 4>(p, t, bl, r, cnt); break;
            case 2: tiles<D, P, 2>(p, t, bl, r, cnt); break;
            default: tiles<D, P, 1>(p, t, bl, r, cnt); break;
          }
          r += mc;
        }
      }
    }
  });
}

// e4m3 (no infinities; S.1111.111 is NaN) magnitude -> bf16 bits, exact
uint16_t fp8_magnitude_bf16(int m) {
  const int e = m >> 3, f = m & 7;
  if (m == 0x7f) return 0x7fc0;
  if (e == 0) return f32_to_bf16(static_cast<float>(f) / 512.0f);  // subnormal: f * 2^-9
  return static_cast<uint16_t>(((e + 120) << 7) | (f << 4));
}

Tables make_tables(const Problem& p) {
  Tables t;
  alignas(64) uint8_t hi[128], lo[128];
  for (int m = 0; m < 128; ++m) {
    const uint16_t v = fp8_magnitude_bf16(m);
    hi[m] = static_cast<uint8_t>(v >> 8);
    lo[m] = static_cast<uint8_t>(v & 0xff);
  }
  t.fp8_hi0 = _mm512_loadu_si512(hi);
  t.fp8_hi1 = _mm512_loadu_si512(hi + 64);
  t.fp8_lo0 = _mm512_loadu_si512(lo);
  t.fp8_lo1 = _mm512_loadu_si512(lo + 64);
  for (int j = 0; j < 4; ++j) {
    alignas(64) uint8_t c[64];
    for (int b = 0; b < 64; ++b) c[b] = (b & 3) == 3 ? static_cast<uint8_t>((b & ~3 & 15) + j) : 0x80;
    t.int8_top[j] = _mm512_load_si512(c);
  }
  t.lut_f32 = p.lut_f32 ? _mm512_loadu_ps(p.lut_f32) : _mm512_setzero_ps();
  t.lut_bf16 = p.lut_bf16 ? _mm512_loadu_si512(p.lut_bf16) : _mm512_setzero_si512();
  t.lut_u8 = p.lut_u8 ? _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.lut_u8)))
                      : _mm512_setzero_si512();
  return t;
}

uint64_t read_block(const uint8_t* p, int64_t bytes) {
  __m512i a = _mm512_setzero_si512(), b = a, c = a, d = a;
  for (int64_t i = 0; i < bytes; i += 256) {
    a = _mm512_xor_si512(a, _mm512_loadu_si512(p + i));
    b = _mm512_xor_si512(b, _mm512_loadu_si512(p + i + 64));
    c = _mm512_xor_si512(c, _mm512_loadu_si512(p + i + 128));
    d = _mm512_xor_si512(d, _mm512_loadu_si512(p + i + 192));
  }
  alignas(64) uint64_t v[8];
  _mm512_store_si512(v, _mm512_xor_si512(_mm512_xor_si512(a, b), _mm512_xor_si512(c, d)));
  return v[0] ^ v[1] ^ v[2] ^ v[3] ^ v[4] ^ v[5] ^ v[6] ^ v[7];
}

}  // namespace

uint64_t read_all_avx512(const uint8_t* p, int64_t bytes) { return read_parallel(p, bytes, read_block); }

void prepare_avx512(const XPrep& a) { prepare_rows<Avx512Isa>(a); }

void run_avx512(const Problem& p) {
  const Tables t = make_tables(p);
  switch (p.fmt) {
    case Fmt::BF16:
      return p.path == Path::B ? run<DecBF16, Path::B>(p, t) : run<DecBF16, Path::A>(p, t);
    case Fmt::INT8:
      if (p.path == Path::C) return run<DecInt8, Path::C>(p, t);
      return p.x_small ? run<DecInt8Top, Path::A>(p, t) : run<DecInt8, Path::A>(p, t);
    case Fmt::FP8:
      return p.path == Path::B ? run<DecFP8, Path::B>(p, t) : run<DecFP8, Path::A>(p, t);
    case Fmt::U4:
      if (p.path == Path::C)
        return p.lut_identity_u8 ? run<DecU4<false>, Path::C>(p, t) : run<DecU4<true>, Path::C>(p, t);
      return p.path == Path::B ? run<DecU4<false>, Path::B>(p, t) : run<DecU4<false>, Path::A>(p, t);
  }
}

}  // namespace zaya_kernels

#pragma GCC pop_options

namespace zaya_kernels {
bool avx512_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512vbmi");
}
}  // namespace zaya_kernels

#else  // not x86-64: the portable loops only

namespace zaya_kernels {
bool avx512_supported() { return false; }
uint64_t read_all_avx512(const uint8_t*, int64_t) { return 0; }
void prepare_avx512(const XPrep&) {}
void run_avx512(const Problem&) {}
}  // namespace zaya_kernels

#endif
