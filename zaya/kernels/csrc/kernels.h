// Matrix-vector kernels for the decode regime (a few activation rows against a large weight).
//
// Every weight format shares one tiling: output rows are taken 16 at a time (an "n-block"), and
// an n-block is stored as consecutive 64-byte units, each holding 4 bytes for each of its 16 rows.
// A unit loads into one 512-bit register whose 32-bit lanes are the 16 output rows, so a kernel
// accumulates 16 outputs per register and never reduces horizontally (the same idea as the
// interleaved "repack" layouts of llama.cpp's ggml-cpu and oneDNN's blocked weights).
//
//   bf16  unit = 2 k per row       4-bit unit = 8 k per row (nibble j of the lane is k + j)
//   int8  unit = 4 k per row       fp8   unit = 4 k per row, bytes arranged for the bf16 unpack
//
// Scales (and the optional per-group offsets, "mins") are stored [n-block][group][16].
// Three inner loops exist:
//   A  weights widened to fp32, FMA with fp32 activations (exact; any activation dtype)
//   B  weights widened to bf16 pairs, vdpbf16ps with bf16 activations (exact products)
//   C  weights as u8, activations quantized to int8 per 32 k, vpdpbusd (llama.cpp's approach;
//      changes the numerics by the activation rounding)
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace zaya_kernels {

enum class Fmt : int { BF16 = 0, INT8 = 1, U4 = 2, FP8 = 3 };
enum class Path : int { A = 0, B = 1, C = 2 };
enum class ScaleType : int { F32 = 0, BF16 = 1, F16 = 2 };

constexpr int kLanes = 16;
constexpr int kUnitBytes = 64;
constexpr int kActBlock = 32;  // activation quantization block of path C

inline int k_per_unit(Fmt f) { return f == Fmt::BF16 ? 2 : f == Fmt::U4 ? 8 : 4; }

// Everything one call needs, with the activations already converted for the chosen path.
struct Problem {
  Fmt fmt;
  Path path;
  int64_t n, kp;            // output rows, padded reduction length (multiple of 32)
  int64_t nb;               // n-blocks
  int64_t group;            // k per scale group (kp when one group per row)
  int64_t ngroups;          // groups per row (kp / group)
  int64_t flush;            // path C: k per int32 accumulation (16 or 32)
  const uint8_t* w;         // expert 0, n-block 0
  int64_t w_expert_stride;  // bytes
  const void* scales;       // nullptr for bf16
  const void* mins;         // nullptr when absent
  ScaleType scale_type;
  int64_t s_expert_stride;  // elements
  // Activations, prepared for the path. x is laid out [unit][row][k of the unit, in the order the
  // unit's decoded vectors use] so an inner loop reaches every row with one pointer and constant
  // offsets; per-block values are [block][row].
  const void* x;            // A: float, B: uint16 (bf16), C: int8
  int64_t rows;             // rows of x (all experts' rows, grouped by expert)
  const float* xd;          // C: activation scale per 32 k, [kp/32][rows]
  const int32_t* xcorr;     // C: offset correction per flush block, [kp/flush][rows]
  const float* xsum;        // row sums per group, [ngroups][rows] (when mins)
  // 4-bit value tables
  const float* lut_f32;     // path A
  const uint16_t* lut_bf16; // path B (32 entries: the 16 values twice)
  const uint8_t* lut_u8;    // path C (16 entries, value + offset)
  bool lut_identity_u8;     // path C: the u8 table is 0..15, skip the shuffle
  // rows grouped by expert: segment s covers rows [seg_begin[s], seg_begin[s+1]) of x
  int nseg;
  const int64_t* seg_expert;
  const int64_t* seg_begin;
  const int64_t* out_row;   // x row -> output row
  void* out;                // [M][ldo], fp32 or bf16
  bool out_bf16;
  int64_t ldo;
  // path A, int8 weights: every |x| < 2^64, so the AVX-512 loop may widen a weight q to q * 2^24
  // (a byte shuffle, no shifts) and take the 2^-24 back out of each group's sum, exactly
  bool x_small = false;
};

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN stays NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);  // round to nearest even
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Splits [0, bytes) into 64 KB blocks across threads and XOR-combines read_block's results.
template <class ReadBlock>
uint64_t read_parallel(const uint8_t* p, int64_t bytes, const ReadBlock& read_block) {
  constexpr int64_t kBlock = 1 << 16;
  const int64_t nblocks = (bytes + kBlock - 1) / kBlock;
  std::vector<uint64_t> part(static_cast<size_t>(at::get_num_threads()) + 1, 0);
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    uint64_t acc = 0;
    for (int64_t b = b0; b < b1; ++b) acc ^= read_block(p + b * kBlock, std::min(kBlock, bytes - b * kBlock));
    part[at::get_thread_num()] ^= acc;
  });
  uint64_t out = 0;
  for (uint64_t v : part) out ^= v;
  return out;
}

// Writes the valid lanes of an n-block's results for rows [row0, row0 + mc) of x.
inline void store_tile(const Problem& p, int64_t nb, int64_t row0, int mc, const float (*acc)[kLanes]) {
  const int64_t n0 = nb * kLanes;
  const int valid = static_cast<int>(std::min<int64_t>(kLanes, p.n - n0));
  for (int m = 0; m < mc; ++m) {
    const int64_t r = p.out_row[row0 + m];
    if (p.out_bf16) {
      uint16_t* o = static_cast<uint16_t*>(p.out) + r * p.ldo + n0;
      for (int l = 0; l < valid; ++l) o[l] = f32_to_bf16(acc[m][l]);
    } else {
      float* o = static_cast<float*>(p.out) + r * p.ldo + n0;
      for (int l = 0; l < valid; ++l) o[l] = acc[m][l];
    }
  }
}

// The portable kernels' loop (the AVX-512 one, run() in gemv_avx512.cpp, takes several n-blocks
// per step the same way): n-blocks split across threads; inside, each expert's rows in
// chunks of at most 8 (the register budget of the inner loops), so an n-block is streamed once
// per expert and reused from cache by the later chunks. tile(w, s, mn, nb, row0, mc) computes
// and stores one chunk; w / s / mn point at the n-block's weights, scales and mins.
template <class Tile>
void drive(const Problem& p, const Tile& tile) {
  const int64_t unit_per_nb = p.kp / k_per_unit(p.fmt);
  const int64_t nb_bytes = unit_per_nb * kUnitBytes;
  const int64_t s_size = p.scale_type == ScaleType::F32 ? 4 : 2;
  const int64_t s_per_nb = p.ngroups * kLanes;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / nb_bytes);
  at::parallel_for(0, p.nb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int s = 0; s < p.nseg; ++s) {
        const int64_t e = p.seg_expert[s];
        const uint8_t* w = p.w + e * p.w_expert_stride + nb * nb_bytes;
        const int64_t soff = (e * p.s_expert_stride + nb * s_per_nb) * s_size;
        const uint8_t* sc = p.scales ? static_cast<const uint8_t*>(p.scales) + soff : nullptr;
        const uint8_t* mn = p.mins ? static_cast<const uint8_t*>(p.mins) + soff : nullptr;
        for (int64_t r = p.seg_begin[s]; r < p.seg_begin[s + 1];) {
          const int64_t left = p.seg_begin[s + 1] - r;
          const int mc = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
          tile(w, sc, mn, nb, r, mc);
          r += mc;
        }
      }
    }
  });
}

// Input and outputs of the activation preparation (prep.h).
struct XPrep {
  Fmt fmt;
  Path path;
  int64_t k, kp, rows, group, ngroups, flush;
  const void* const* src;  // one pointer per row, in the order the kernel will see them
  bool src_bf16;
  int32_t offset;          // path C: the weights' unsigned offset (128 for int8)
  float inv_p;             // path C: 1 / the 4-bit table's power-of-two scale
  void* x;                 // [kp * rows] elements of the path's type
  float* xd;               // path C: [kp / 32][rows]
  int32_t* xcorr;          // path C: [kp / flush][rows]
  float* xsum;             // [ngroups][rows], or nullptr
};

// XOR of every 64-bit word of [p, p + bytes) (bytes a multiple of 64): a pure read at the
// bandwidth the kernels can reach, split across threads as they are.
uint64_t read_all_avx512(const uint8_t* p, int64_t bytes);
uint64_t read_all_portable(const uint8_t* p, int64_t bytes);

bool avx512_supported();
void prepare_avx512(const XPrep& a);
void prepare_portable(const XPrep& a);
void run_avx512(const Problem& p);
void run_portable(const Problem& p);

}  // namespace zaya_kernels
