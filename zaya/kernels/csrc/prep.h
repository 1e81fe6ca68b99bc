// Activation preparation, shared by both instruction sets: each translation unit includes this
// file (in an anonymous namespace, so the copies never merge) and instantiates prepare_rows with
// its own primitives. The AVX-512 unit includes it under its target pragma, so the plain loops
// here are vectorized for that target too.
#pragma once

#include <vector>

#include "kernels.h"

namespace zaya_kernels {
namespace {

// Position s of each 8-k unit of the 4-bit paths holds k = order[s] (see gemv_avx512.cpp).
constexpr int kU4Pairs[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // path B: bf16 pairs (s, s + 4)
constexpr int kU4Quads[8] = {0, 2, 4, 6, 1, 3, 5, 7};  // path C: low nibbles, then high nibbles

// Copies one row, unit by unit, into the [unit][row][slot] layout.
template <int kChunk>
void interleave(uint8_t* out, const uint8_t* row, int64_t units, int64_t rows, int64_t r) {
  for (int64_t u = 0; u < units; ++u) std::memcpy(out + (u * rows + r) * kChunk, row + u * kChunk, kChunk);
}

void interleave_row(uint8_t* out, const uint8_t* row, int64_t units, int64_t rows, int64_t r, int chunk) {
  if (rows == 1) {
    std::memcpy(out, row, units * chunk);
    return;
  }
  switch (chunk) {
    case 4: return interleave<4>(out, row, units, rows, r);
    case 8: return interleave<8>(out, row, units, rows, r);
    case 16: return interleave<16>(out, row, units, rows, r);
    default: return interleave<32>(out, row, units, rows, r);
  }
}

// Isa supplies:
//   quantize32(const float* x, int8_t* q) -> float   rounds 32 values (absmax / 127 scale, half
//                                                    to even), returns the scale
//   permute8(T* v, int64_t n, const int* order)      reorders each run of 8 elements, T = uint16_t / int8_t
template <class Isa>
void prepare_rows(const XPrep& a) {
  thread_local std::vector<float> xf;
  thread_local std::vector<uint16_t> xb;
  thread_local std::vector<int8_t> xq;
  const int64_t kp = a.kp, R = a.rows, kpu = k_per_unit(a.fmt), units = kp / kpu;
  xf.assign(kp, 0.0f);
  for (int64_t r = 0; r < R; ++r) {
    if (a.src_bf16) {
      const uint16_t* src = static_cast<const uint16_t*>(a.src[r]);
      for (int64_t k = 0; k < a.k; ++k) xf[k] = bf16_to_f32(src[k]);
    } else {
      std::memcpy(xf.data(), a.src[r], a.k * sizeof(float));
    }
    if (a.xsum) {
      for (int64_t g = 0; g < a.ngroups; ++g) {
        float s = 0;
        for (int64_t k = g * a.group; k < (g + 1) * a.group; ++k) s += xf[k];
        a.xsum[g * R + r] = s;
      }
    }
    uint8_t* out = static_cast<uint8_t*>(a.x);
    if (a.path == Path::A) {
      interleave_row(out, reinterpret_cast<const uint8_t*>(xf.data()), units, R, r, static_cast<int>(kpu * 4));
    } else if (a.path == Path::B) {
      xb.resize(kp);
      for (int64_t k = 0; k < kp; ++k) xb[k] = static_cast<uint16_t>(reinterpret_cast<const uint32_t*>(xf.data())[k] >> 16);
      if (a.fmt == Fmt::U4) Isa::permute8(xb.data(), kp, kU4Pairs);
      interleave_row(out, reinterpret_cast<const uint8_t*>(xb.data()), units, R, r, static_cast<int>(kpu * 2));
    } else {
      xq.resize(kp);
      const int64_t nact = kp / kActBlock, per_act = kActBlock / a.flush;
      for (int64_t b = 0; b < nact; ++b) {
        int8_t* q = xq.data() + b * kActBlock;
        a.xd[b * R + r] = Isa::quantize32(xf.data() + b * kActBlock, q) * a.inv_p;
        for (int64_t f = 0; f < per_act; ++f) {
          int32_t s = 0;
          for (int64_t k = f * a.flush; k < (f + 1) * a.flush; ++k) s += q[k];
          a.xcorr[(b * per_act + f) * R + r] = -a.offset * s;
        }
      }
      if (a.fmt == Fmt::U4) Isa::permute8(xq.data(), kp, kU4Quads);
      interleave_row(out, reinterpret_cast<const uint8_t*>(xq.data()), units, R, r, static_cast<int>(kpu));
    }
  }
}

}  // namespace
}  // namespace zaya_kernels
