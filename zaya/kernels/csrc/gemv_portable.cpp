// Portable inner loops: plain C++ over the same layouts and activation buffers as the AVX-512
// ones, for CPUs without AVX-512 BF16/VNNI. Paths A (fp32) and C (int8 activations, emulated in
// int32 exactly as vpdpbusd computes it); path B is AVX-512 only, so the caller picks A instead.
#include "kernels.h"
#include "prep.h"

namespace zaya_kernels {
namespace {

constexpr int kMaxRows = 8;

inline int32_t lane_word(const uint8_t* u, int l) {
  int32_t v;
  std::memcpy(&v, u + 4 * l, 4);
  return v;
}

float fp8_value(uint8_t b) {
  const int m = b & 0x7f, e = m >> 3, f = m & 7;
  float v;
  if (m == 0x7f) {
    v = bf16_to_f32(0x7fc0);
  } else if (e == 0) {
    v = static_cast<float>(f) / 512.0f;
  } else {
    uint32_t u = static_cast<uint32_t>(((e + 120) << 7) | (f << 4)) << 16;
    std::memcpy(&v, &u, 4);
  }
  return (b & 0x80) ? -v : v;
}

// The unit's weights for lane l in natural k order (path A).
void decode_float(const Problem& p, const uint8_t* u, float (*f)[kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t v = static_cast<uint32_t>(lane_word(u, l));
    switch (p.fmt) {
      case Fmt::BF16:
        f[0][l] = bf16_to_f32(static_cast<uint16_t>(v & 0xffff));
        f[1][l] = bf16_to_f32(static_cast<uint16_t>(v >> 16));
        break;
      case Fmt::INT8:
        for (int j = 0; j < 4; ++j) f[j][l] = static_cast<float>(static_cast<int8_t>((v >> (8 * j)) & 0xff));
        break;
      case Fmt::U4:
        for (int j = 0; j < 8; ++j) f[j][l] = p.lut_f32[(v >> (4 * j)) & 0xf];
        break;
      case Fmt::FP8: {
        // lane l = 4 * lane128 + i holds k0, k1 at bytes 16 * lane128 + 2i (+1) and k2, k3 eight later
        const uint8_t* b = u + 16 * (l / 4) + 2 * (l % 4);
        f[0][l] = fp8_value(b[0]);
        f[1][l] = fp8_value(b[1]);
        f[2][l] = fp8_value(b[8]);
        f[3][l] = fp8_value(b[9]);
        break;
      }
    }
  }
}

// The unit's weights as the unsigned bytes path C multiplies, in path C's k order.
void decode_int(const Problem& p, const uint8_t* u, int32_t (*q)[kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const uint32_t v = static_cast<uint32_t>(lane_word(u, l));
    if (p.fmt == Fmt::INT8) {
      for (int j = 0; j < 4; ++j) q[j][l] = static_cast<int32_t>(((v >> (8 * j)) & 0xff) ^ 0x80);
    } else {  // nibbles 0, 2, 4, 6 then 1, 3, 5, 7
      for (int j = 0; j < 4; ++j) {
        q[j][l] = p.lut_u8[(v >> (8 * j)) & 0xf];
        q[4 + j][l] = p.lut_u8[(v >> (8 * j + 4)) & 0xf];
      }
    }
  }
}

float scale_at(const uint8_t* s, ScaleType t, int64_t i) {
  switch (t) {
    case ScaleType::BF16: {
      uint16_t h;
      std::memcpy(&h, s + 2 * i, 2);
      return bf16_to_f32(h);
    }
    case ScaleType::F16: {
      uint16_t h;
      std::memcpy(&h, s + 2 * i, 2);
      const uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1f, f = h & 0x3ff;
      float v;
      if (e == 0) {
        v = std::ldexp(static_cast<float>(f), -24);
      } else if (e == 31) {
        uint32_t u = 0x7f800000u | (f << 13);
        std::memcpy(&v, &u, 4);
      } else {
        uint32_t u = ((e + 112) << 23) | (f << 13);
        std::memcpy(&v, &u, 4);
      }
      return sign ? -v : v;
    }
    default: {
      float v;
      std::memcpy(&v, s + 4 * i, 4);
      return v;
    }
  }
}

void finish_group(const Problem& p, const uint8_t* sc, const uint8_t* mn, int64_t g, int64_t row0, int mc,
                  float (*part)[kLanes], float (*acc)[kLanes]) {
  for (int l = 0; l < kLanes; ++l) {
    const float s = sc ? scale_at(sc, p.scale_type, g * kLanes + l) : 1.0f;
    const float z = mn ? scale_at(mn, p.scale_type, g * kLanes + l) : 0.0f;
    for (int m = 0; m < mc; ++m) {
      acc[m][l] = sc ? std::fma(part[m][l], s, acc[m][l]) : part[m][l] + acc[m][l];
      if (mn) acc[m][l] = std::fma(z, p.xsum[g * p.rows + row0 + m], acc[m][l]);
    }
  }
}

// x is [unit][row][kpu elements]: unit u of row r starts at element (u * rows + r) * kpu
void tile_float(const Problem& p, const uint8_t* w, const uint8_t* sc, const uint8_t* mn, int64_t nb,
                int64_t row0, int mc) {
  const int kpu = k_per_unit(p.fmt);
  const int64_t units = p.group / kpu;
  float acc[kMaxRows][kLanes] = {}, part[kMaxRows][kLanes], f[8][kLanes];
  for (int64_t g = 0; g < p.ngroups; ++g) {
    std::memset(part, 0, sizeof(part));
    for (int64_t u = 0; u < units; ++u) {
      const int64_t unit = g * units + u;
      decode_float(p, w + unit * kUnitBytes, f);
      const float* x = static_cast<const float*>(p.x) + (unit * p.rows + row0) * kpu;
      for (int j = 0; j < kpu; ++j)
        for (int m = 0; m < mc; ++m)
          for (int l = 0; l < kLanes; ++l) part[m][l] = std::fma(f[j][l], x[m * kpu + j], part[m][l]);
    }
    finish_group(p, sc, mn, g, row0, mc, part, acc);
  }
  store_tile(p, nb, row0, mc, acc);
}

void tile_int(const Problem& p, const uint8_t* w, const uint8_t* sc, const uint8_t* mn, int64_t nb, int64_t row0,
              int mc) {
  const int kpu = k_per_unit(p.fmt);
  const int64_t units = p.flush / kpu, blocks = p.group / p.flush;
  float acc[kMaxRows][kLanes] = {}, part[kMaxRows][kLanes];
  int32_t iacc[kMaxRows][kLanes], q[8][kLanes];
  for (int64_t g = 0; g < p.ngroups; ++g) {
    std::memset(part, 0, sizeof(part));
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t fb = g * blocks + b;
      for (int m = 0; m < mc; ++m)
        for (int l = 0; l < kLanes; ++l) iacc[m][l] = p.xcorr[fb * p.rows + row0 + m];
      for (int64_t u = 0; u < units; ++u) {
        const int64_t unit = fb * units + u;
        decode_int(p, w + unit * kUnitBytes, q);
        const int8_t* x = static_cast<const int8_t*>(p.x) + (unit * p.rows + row0) * kpu;
        for (int j = 0; j < kpu; ++j)
          for (int m = 0; m < mc; ++m)
            for (int l = 0; l < kLanes; ++l) iacc[m][l] += q[j][l] * static_cast<int32_t>(x[m * kpu + j]);
      }
      const float* d = p.xd + (fb * p.flush / kActBlock) * p.rows + row0;
      for (int m = 0; m < mc; ++m)
        for (int l = 0; l < kLanes; ++l) part[m][l] = std::fma(static_cast<float>(iacc[m][l]), d[m], part[m][l]);
    }
    finish_group(p, sc, mn, g, row0, mc, part, acc);
  }
  store_tile(p, nb, row0, mc, acc);
}

struct PortableIsa {
  static float quantize32(const float* x, int8_t* q) {
    float amax = 0;
    for (int k = 0; k < kActBlock; ++k) amax = std::max(amax, std::fabs(x[k]));
    const float d = amax / 127.0f, id = d != 0 ? 1.0f / d : 0.0f;
    for (int k = 0; k < kActBlock; ++k)
      q[k] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::nearbyint(x[k] * id))));
    return d;
  }
  template <class T>
  static void permute8(T* v, int64_t n, const int* order) {
    T t[8];
    for (int64_t i = 0; i < n; i += 8) {
      for (int s = 0; s < 8; ++s) t[s] = v[i + order[s]];
      std::memcpy(v + i, t, sizeof(t));
    }
  }
};

uint64_t read_block(const uint8_t* p, int64_t bytes) {
  uint64_t acc[8] = {};
  for (int64_t i = 0; i < bytes; i += 64)
    for (int j = 0; j < 8; ++j) {
      uint64_t v;
      std::memcpy(&v, p + i + 8 * j, 8);
      acc[j] ^= v;
    }
  return acc[0] ^ acc[1] ^ acc[2] ^ acc[3] ^ acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

}  // namespace

uint64_t read_all_portable(const uint8_t* p, int64_t bytes) { return read_parallel(p, bytes, read_block); }

void prepare_portable(const XPrep& a) { prepare_rows<PortableIsa>(a); }

void run_portable(const Problem& p) {
  drive(p, [&](const uint8_t* w, const uint8_t* sc, const uint8_t* mn, int64_t nb, int64_t row0, int mc) {
    if (p.path == Path::C) {
      tile_int(p, w, sc, mn, nb, row0, mc);
    } else {
      tile_float(p, w, sc, mn, nb, row0, mc);
    }
  });
}

}  // namespace zaya_kernels
