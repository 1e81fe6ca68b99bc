// Fused decode operators: a decoder layer's work for S new tokens per sequence (a decode step:
// S = 1; a speculative verify or a short chunk: a few) in two calls.
//
//   fused_attention  input RMSNorm, the q/k/v projections, the CCA one-column conv and GQA mean
//                    mix, q/k L2 norm with temp, partial RoPE, the delayed value, the writes of
//                    the new key, value and CCA state into the paged cache, and attention over
//                    the cache -> the attention output (B*S, Hq*D); with `keep`, also each
//                    sequence's raw q|k columns (B, C, W+S) and delayed values (B, S, Hv), from
//                    which the state after any of its positions is read (rollback, snapshots)
//   fused_moe        output projection, both residual scalings, the post-attention RMSNorm, the
//                    router (down projection, depth carry, RMSNorm, GELU MLP, softmax, biased
//                    top-1) and the SwiGLU expert -> the new residual, router state and expert
//
// Rows are sequence-major (row b*S + j is position j of sequence b). A sequence's positions run
// in order through the conv window and the delayed value, exactly as S decode steps would, so a
// position's result does not depend on how many positions share the call.
//
// The arithmetic is the eager model's (zaya/model.py), op for op: every intermediate the eager
// path holds in the weight dtype is rounded to it here at the same place (bf16: round to nearest
// even), the fp32 residual keeps its fp32 operation order (this file is compiled without FMA
// contraction), and the weight matmuls are the same kernels with the same activations, so their
// results are bit-identical. What differs is only the summation order of reductions (norms, the
// conv's grouped contraction, attention), i.e. fp32 rounding; GELU, SiLU, softmax and top-k call
// the ATen operators the eager path calls, so the router's choice sees the same values. (For S > 1
// the eager model runs Conv1d layers in the weight dtype; every position here takes the eager
// one-column path a decode step takes.)
#pragma GCC optimize("fp-contract=off")

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/tensor.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/softmax.h>
#include <ATen/ops/topk.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace zaya_kernels {

at::Tensor fused_matvec(Fmt fmt, const at::Tensor& x, const at::Tensor& w, const at::Tensor* scales,
                        const at::Tensor* mins, const at::Tensor* lut, int64_t n, int64_t group, bool act_int8,
                        const std::optional<at::Tensor>& expert, std::optional<at::ScalarType> out_dtype);  // ops.cpp

namespace {

// One weight in the kernels' layout: five list entries (data, scales, mins, lut, fp32 bias) and
// four integers (format, n, group, act_int8), as zaya.fused flattens a kernels.Matmul. Format -1 is
// a dense float32 matrix (n, K) or stack of them (experts, n, K), multiplied by ATen's matmul: a
// float32 model's weights, as its eager linears hold them.
struct Mat {
  Fmt fmt;
  bool dense;
  at::Tensor data;
  std::optional<at::Tensor> scales, mins, lut, bias;
  int64_t n, group;
  bool act_int8;
};

constexpr int kMatTensors = 5, kMatInts = 4;

std::vector<Mat> unpack_mats(const c10::List<std::optional<at::Tensor>>& t, at::IntArrayRef meta) {
  TORCH_CHECK(t.size() % kMatTensors == 0 && meta.size() * kMatTensors == t.size() * kMatInts,
              "zaya fused: ", t.size(), " weight tensors and ", meta.size(),
              " integers do not describe whole matrices");
  std::vector<Mat> out;
  for (size_t i = 0; i * kMatTensors < t.size(); ++i) {
    Mat m;
    const size_t a = i * kMatTensors, b = i * kMatInts;
    TORCH_CHECK(t.get(a).has_value(), "zaya fused: matrix ", i, " has no data");
    m.data = *t.get(a);
    m.scales = t.get(a + 1);
    m.mins = t.get(a + 2);
    m.lut = t.get(a + 3);
    m.bias = t.get(a + 4);
    m.dense = meta[b] < 0;
    m.fmt = m.dense ? Fmt::BF16 : static_cast<Fmt>(meta[b]);
    TORCH_CHECK(!m.dense || (m.data.scalar_type() == at::kFloat && m.data.is_contiguous()),
                "zaya fused: a dense matrix must be contiguous float32");
    m.n = meta[b + 1];
    m.group = meta[b + 2];
    m.act_int8 = meta[b + 3] != 0;
    out.push_back(std::move(m));
  }
  return out;
}

// x (rows, K) times a dense float32 matrix, or each row times its expert's (a negative expert:
// zeros), rows of one expert in one matmul as the eager experts run them.
at::Tensor dense_matmul(const Mat& m, const at::Tensor& x, const std::optional<at::Tensor>& expert) {
  const at::Tensor xf = x.to(at::kFloat);
  if (!expert) return at::mm(xf, m.data.t());
  const at::Tensor ex = expert->to(at::kLong).contiguous();
  const int64_t* ep = ex.data_ptr<int64_t>();
  at::Tensor y = at::zeros({x.size(0), m.n}, xf.options());
  std::vector<std::vector<int64_t>> rows(m.data.size(0));
  for (int64_t r = 0; r < x.size(0); ++r) {
    TORCH_CHECK(ep[r] < m.data.size(0), "zaya fused: expert ", ep[r], " out of range");
    if (ep[r] >= 0) rows[ep[r]].push_back(r);
  }
  for (size_t e = 0; e < rows.size(); ++e) {
    if (rows[e].empty()) continue;
    const at::Tensor idx = at::tensor(rows[e], ex.options());
    y.index_copy_(0, idx, at::mm(xf.index_select(0, idx), m.data[static_cast<int64_t>(e)].t()));
  }
  return y;
}

// kernels.Matmul(x, expert): the kernel's fp32 sums, plus the fp32 bias; float32 [rows, n].
at::Tensor apply(const Mat& m, const at::Tensor& x, const std::optional<at::Tensor>& expert = std::nullopt) {
  const at::Tensor* s = m.scales ? &*m.scales : nullptr;
  const at::Tensor* mn = m.mins ? &*m.mins : nullptr;
  const at::Tensor* l = m.lut ? &*m.lut : nullptr;
  at::Tensor y = m.dense ? dense_matmul(m, x, expert)
                         : fused_matvec(m.fmt, x, m.data, s, mn, l, m.n, m.group, m.act_int8, expert, at::kFloat);
  if (m.bias) {
    const at::Tensor b = m.bias->contiguous();
    TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == m.n, "zaya fused: a bias must be float32 of n values");
    const float* bp = b.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t r = 0; r < y.size(0); ++r)
      for (int64_t j = 0; j < m.n; ++j) yp[r * m.n + j] += bp[j];
  }
  return y;
}

// The loops whose cost grows with the model or the context (the conv contraction, attention),
// compiled for AVX-512, AVX2 and the baseline and chosen at load (their results are not compared
// bit for bit with the eager path: its reductions run in another order anyway).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ZAYA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ZAYA_CLONES
#endif

template <class T>
__attribute__((always_inline)) inline float widen(T v) {
  if constexpr (sizeof(T) == 2) {
    return bf16_to_f32(v);
  } else {
    return v;
  }
}

// Attention scores of grp query rows (q, [grp][D]) against L keys, key l being row
// slots[l] (or start + l) of the pool: sc[j * L + l] = q_j . k_l.
template <class T>
__attribute__((always_inline)) inline void scores_impl(float* sc, const float* q, int64_t grp, const T* keys,
                                                       const int64_t* slots, int64_t start, int64_t L, int64_t D) {
  for (int64_t l = 0; l < L; ++l) {
    const T* k = keys + (slots ? slots[l] : start + l) * D;
    for (int64_t j = 0; j < grp; ++j) {
      const float* qj = q + j * D;
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qj[d] * widen(k[d]);
      sc[j * L + l] = s;
    }
  }
}

// acc[D] += sum over l of p[l] * value row l (rows as in scores_impl).
template <class T>
__attribute__((always_inline)) inline void values_impl(float* acc, const float* p, const T* values,
                                                       const int64_t* slots, int64_t start, int64_t L, int64_t D) {
  for (int64_t l = 0; l < L; ++l) {
    if (p[l] == 0.0f) continue;
    const T* v = values + (slots ? slots[l] : start + l) * D;
    const float pl = p[l];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += pl * widen(v[d]);
  }
}

ZAYA_CLONES void scores_bf16(float* sc, const float* q, int64_t grp, const uint16_t* keys, const int64_t* slots,
                             int64_t start, int64_t L, int64_t D) {
  scores_impl(sc, q, grp, keys, slots, start, L, D);
}
ZAYA_CLONES void scores_f32(float* sc, const float* q, int64_t grp, const float* keys, const int64_t* slots,
                            int64_t start, int64_t L, int64_t D) {
  scores_impl(sc, q, grp, keys, slots, start, L, D);
}
ZAYA_CLONES void values_bf16(float* acc, const float* p, const uint16_t* values, const int64_t* slots, int64_t start,
                             int64_t L, int64_t D) {
  values_impl(acc, p, values, slots, start, L, D);
}
ZAYA_CLONES void values_f32(float* acc, const float* p, const float* values, const int64_t* slots, int64_t start,
                            int64_t L, int64_t D) {
  values_impl(acc, p, values, slots, start, L, D);
}

// e^x for x <= 0 in fp32, branch-free so a loop of it vectorizes (std::exp does not): x = n ln2 + r
// with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 (relative error below 2^-23 on that
// range), 2^n put into the exponent bits; x below -87.3 (past the smallest normal float, and the
// -inf of a masked key) gives exactly 0.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.3f);
  const float t = xc * 1.44269504f + 12582912.0f;  // 1.5 * 2^23: rounds x / ln2 to an integer
  const float n = t - 12582912.0f;
  const float r = (xc - n * 0.693145752f) - n * 1.42860677e-06f;  // ln 2 in two parts (Cody-Waite)
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return x < -87.3f ? 0.0f : p * scale;
}

// Softmax over one query's L scores in place, each scaled first; masked keys (mk[l] false) get 0.
ZAYA_CLONES void softmax_scaled(float* s, int64_t L, const bool* mk, float scale) {
  const float neg = -std::numeric_limits<float>::infinity();
  float mx = neg;
  for (int64_t l = 0; l < L; ++l) {
    s[l] = mk && !mk[l] ? neg : s[l] * scale;
    mx = std::max(mx, s[l]);
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < L; ++l) {
    s[l] = exp_nonpositive(s[l] - mx);
    sum += s[l];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) s[l] *= inv;
}

// The grouped conv for the newest column of R rows: x[r][g][o] = sum over k of dw[r][g][k] *
// k1[g][k][o] (no bias), each weight row read once for all rows; per (r, o) the sum runs over k in
// order, as the eager one-column contraction's does.
template <class T>
__attribute__((always_inline)) inline void conv_grouped_impl(float* x, const float* dw, const T* k1, int64_t R,
                                                             int64_t G, int64_t D, int64_t Kt) {
  const int64_t C = G * D;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) x[r * C + c] = 0.0f;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t k = 0; k < Kt; ++k) {
      const T* w = k1 + (g * Kt + k) * D;
      for (int64_t r = 0; r < R; ++r) {
        const float v = dw[(r * G + g) * Kt + k];
        float* acc = x + r * C + g * D;
#pragma omp simd
        for (int64_t o = 0; o < D; ++o) acc[o] += v * widen(w[o]);
      }
    }
}

ZAYA_CLONES void conv_grouped_bf16(float* x, const float* dw, const uint16_t* k1, int64_t R, int64_t G, int64_t D,
                                   int64_t Kt) {
  conv_grouped_impl(x, dw, k1, R, G, D, Kt);
}
ZAYA_CLONES void conv_grouped_f32(float* x, const float* dw, const float* k1, int64_t R, int64_t G, int64_t D,
                                  int64_t Kt) {
  conv_grouped_impl(x, dw, k1, R, G, D, Kt);
}

// GELU (erf form) as ATen's vectorized CPU kernel computes it for reduced-precision tensors:
// x * 0.5 * (1 + erf(x / sqrt 2)) in fp32 with ATen's polynomial erf (Abramowitz-Stegun 7.1.26,
// its fused multiply-adds kept); only its exp may round differently from the library's, rarely.
inline float gelu_aten(float x) {
  const float z = x * static_cast<float>(M_SQRT1_2);
  const float a = std::fabs(z);
  const float t = 1.0f / std::fma(0.3275911f, a, 1.0f);
  float r = std::fma(1.061405429f, t, -1.453152027f);
  r = std::fma(r, t, 1.421413741f);
  r = std::fma(r, t, -0.284496736f);
  r = std::fma(r, t, 0.254829592f);
  const float e = -std::exp(-(z * z));
  const float erf_abs = std::fma(e * t, r, 1.0f);
  const float erf = std::copysign(1.0f, z) * erf_abs;
  return x * 0.5f * (1.0f + erf);
}

// Values in the weight dtype: bf16 rounds, fp32 keeps (a template parameter, so loops specialise).
template <bool BF>
struct Dt {
  static constexpr bool bf = BF;
  inline float rd(float v) const {
    if constexpr (BF) {
      return bf16_to_f32(f32_to_bf16(v));
    } else {
      return v;
    }
  }
  inline float get(const void* p, int64_t i) const {
    if constexpr (BF) {
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    } else {
      return static_cast<const float*>(p)[i];
    }
  }
  inline void put(void* p, int64_t i, float v) const {
    if constexpr (BF) {
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
    } else {
      static_cast<float*>(p)[i] = v;
    }
  }
};

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kFloat,
              "zaya fused: weights must be bfloat16 or float32, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

void check(const at::Tensor& t, at::ScalarType st, std::initializer_list<int64_t> shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == st && t.is_contiguous() &&
                  t.sizes().vec() == std::vector<int64_t>(shape),
              "zaya fused: ", name, " must be a contiguous CPU ", st, " tensor of shape ", at::IntArrayRef(shape),
              ", got ", t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)");
}

// ZayaRMSNorm on x rounded to the weight dtype: y = w * round(x * rsqrt(mean(x^2) + eps)).
template <class D>
void rms_norm_row(const D& dt, const float* x, int64_t n, const void* w, float eps, void* out, int64_t row) {
  float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) dt.put(out, row * n + i, dt.get(w, i) * dt.rd(x[i] * r));
}

// Residual scaling: (branch + b) * s in the weight dtype, plus (residual + rb) * rs in fp32.
template <class D>
void residual(const D& dt, const float* branch, const float* h, const void* const* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = dt.rd(dt.rd(branch[i] + dt.get(p[0], i)) * dt.get(p[1], i));
    const float u = (h[i] + dt.get(p[2], i)) * dt.get(p[3], i);
    out[i] = t + u;
  }
}

// The slots of each row's entries: a tensor of them, or consecutive from a start (row b, entry i
// at start + b * per_row + i).
struct Slots {
  const int64_t* idx = nullptr;
  int64_t start = 0, per_row = 1;
  int64_t at(int64_t b, int64_t i) const { return idx ? idx[b * per_row + i] : start + b * per_row + i; }
};

Slots slots_of(const std::optional<at::Tensor>& t, int64_t start, int64_t rows, int64_t per_row, const char* name,
               at::Tensor& keep) {
  Slots s;
  s.start = start;
  s.per_row = per_row;
  if (t) {
    keep = t->to(at::kLong).contiguous();
    TORCH_CHECK(keep.numel() == rows * per_row, "zaya fused: ", name, " has ", keep.numel(), " entries, expected ",
                rows * per_row);
    s.idx = keep.data_ptr<int64_t>();
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention(const at::Tensor& h, const at::Tensor& norm_w, double eps,
                           const c10::List<std::optional<at::Tensor>>& qkv_t, at::IntArrayRef qkv_meta,
                           const at::Tensor& k0, const at::Tensor& b0, const at::Tensor& k1, const at::Tensor& b1,
                           const at::Tensor& temp, const at::Tensor& cos, const at::Tensor& sin,
                           const at::Tensor& conv, const at::Tensor& vdelay, const std::optional<at::Tensor>& state,
                           int64_t state0, const at::Tensor& kv, const std::optional<at::Tensor>& write,
                           int64_t write0, const std::optional<at::Tensor>& read, int64_t read0, int64_t L,
                           const std::optional<at::Tensor>& mask, int64_t Hq, int64_t Hkv, int64_t D, int64_t S,
                           bool keep) {
  auto run = [&](const auto& dt) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    using DT = std::decay_t<decltype(dt)>;
    const at::ScalarType wst = norm_w.scalar_type();
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(),
                "zaya fused: h must be (B*S, H) float32");
    const int64_t R = h.size(0), H = h.size(1);
    TORCH_CHECK(S >= 1 && R % S == 0, "zaya fused: ", R, " rows are not whole sequences of ", S, " positions");
    const int64_t B = R / S;
    const int64_t Q = Hq * D, KV = Hkv * D, Hv = KV / 2, C = Q + KV, G = Hq + Hkv, grp = Hq / Hkv;
    const int64_t t0 = k0.size(1), t1 = k1.size(1) / D, W = conv.size(2), rot = cos.size(1);
    TORCH_CHECK(W == t0 + t1 - 2, "zaya fused: a conv state of ", W, " columns does not fit taps ", t0, " and ", t1);
    check(norm_w, wst, {H}, "norm weight");
    check(k0, at::kFloat, {C, t0}, "conv_k0");
    check(b0, at::kFloat, {C}, "conv_b0");
    check(k1, wst, {G, D * t1, D}, "conv_k1 (groups, inputs x taps, outputs)");
    check(b1, at::kFloat, {C}, "conv_b1");
    check(temp, wst, {Hkv}, "temp");
    check(cos, wst, {R, rot}, "cos");
    check(sin, wst, {R, rot}, "sin");
    TORCH_CHECK(conv.scalar_type() == wst && conv.is_contiguous() && conv.dim() == 3 && conv.size(1) == C,
                "zaya fused: conv state must be contiguous (slots, ", C, ", W) in the weight dtype");
    TORCH_CHECK(vdelay.scalar_type() == wst && vdelay.is_contiguous() && vdelay.dim() == 2 && vdelay.size(1) == Hv,
                "zaya fused: delayed values must be contiguous (slots, ", Hv, ") in the weight dtype");
    TORCH_CHECK(kv.scalar_type() == wst && kv.is_contiguous() && kv.dim() == 4 && kv.size(0) == 2 && kv.size(1) == Hkv &&
                    kv.size(3) == D,
                "zaya fused: kv must be a contiguous (2, ", Hkv, ", slots, ", D, ") pool in the weight dtype");
    TORCH_CHECK(rot % 2 == 0 && rot <= D && Hq % Hkv == 0 && L >= 1, "zaya fused: bad head or rope shape");
    at::Tensor keep_s, keep_w, keep_r, keep_m;
    const Slots ss = slots_of(state, state0, B, 1, "state slots", keep_s);
    const Slots ws = slots_of(write, write0, B, S, "write slots", keep_w);
    const Slots rs = slots_of(read, read0, B, L, "read slots", keep_r);
    const bool* mk = nullptr;
    if (mask) {
      keep_m = mask->to(at::kBool).contiguous();
      TORCH_CHECK(keep_m.numel() == R * L, "zaya fused: mask must have B * S * L entries");
      mk = keep_m.data_ptr<bool>();
    }
    const int64_t N = kv.size(2);

    // input norm, then the projections in order ([q | k | v current | v delayed])
    std::vector<float> hrow(H);
    at::Tensor a = at::empty({R, H}, h.options().dtype(wst));
    for (int64_t b = 0; b < R; ++b) {
      for (int64_t i = 0; i < H; ++i) hrow[i] = dt.rd(h.data_ptr<float>()[b * H + i]);
      rms_norm_row(dt, hrow.data(), H, norm_w.data_ptr(), static_cast<float>(eps), a.data_ptr(), b);
    }
    const std::vector<Mat> mats = unpack_mats(qkv_t, qkv_meta);
    const int64_t P = C + 2 * Hv;
    std::vector<float> qkv(R * P);
    int64_t col = 0;
    for (const Mat& m : mats) {
      const at::Tensor y = apply(m, a);
      const float* yp = y.data_ptr<float>();
      TORCH_CHECK(col + m.n <= P, "zaya fused: the projections give more than q, k and the value halves");
      for (int64_t b = 0; b < R; ++b)
        for (int64_t j = 0; j < m.n; ++j) qkv[b * P + col + j] = dt.rd(yp[b * m.n + j]);
      col += m.n;
    }
    TORCH_CHECK(col == P, "zaya fused: the projections give ", col, " columns, expected ", P);

    const float scale_qk = std::sqrt(static_cast<float>(D)), attn_scale = 1.0f / std::sqrt(static_cast<float>(D));
    const float eps_qk = dt.bf ? 0.0078125f : std::numeric_limits<float>::epsilon();
    const float* k0p = k0.data_ptr<float>();
    const float* b0p = b0.data_ptr<float>();
    const float* b1p = b1.data_ptr<float>();
    // Three passes over the rows. 1: per row in order (a sequence's positions one after another),
    // the GQA mean mix, the depthwise conv over the window [state | new column], the delayed value
    // and the writes of the new state and value. 2: the grouped conv for all rows at once, so its
    // weights are read once per call, not once per row. 3: per row, q and k normed and rotated, the
    // key written.
    std::vector<float> qrot(R * Q), res(R * (Q + KV)), dw(R * C * t1), x(R * C);
    std::vector<float> win(C * (W + 1)), v(KV);
    at::Tensor kept_qk = at::empty({keep ? B : 0, C, W + S}, h.options().dtype(wst));
    at::Tensor kept_v = at::empty({keep ? B : 0, S, Hv}, h.options().dtype(wst));
    std::vector<int64_t> wslots(R);
    for (int64_t row = 0; row < R; ++row) {
      const int64_t b = row / S, pos = row % S;
      const float* r = &qkv[row * P];
      float* qres = &res[row * (Q + KV)];
      float* kres = qres + Q;
      // GQA mean mix of the pre-conv values
      for (int64_t hh = 0; hh < Hq; ++hh)
        for (int64_t d = 0; d < D; ++d) qres[hh * D + d] = dt.rd(dt.rd(r[hh * D + d] + r[Q + (hh / grp) * D + d]) * 0.5f);
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t d = 0; d < D; ++d) {
          float s = 0.0f;
          for (int64_t j = 0; j < grp; ++j) s += qres[(g * grp + j) * D + d];
          kres[g * D + d] = dt.rd(dt.rd(s) / static_cast<float>(grp));
        }
      // the conv window: the state's W columns, then the new one; the state becomes its last W
      const int64_t slot = ss.at(b, 0);
      TORCH_CHECK(slot >= 0 && slot < conv.size(0), "zaya fused: state slot ", slot, " out of range");
      void* cs = static_cast<uint8_t*>(conv.data_ptr()) + slot * C * W * conv.element_size();
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t t = 0; t < W; ++t) win[c * (W + 1) + t] = dt.get(cs, c * W + t);
        win[c * (W + 1) + W] = r[c];
      }
      if (keep) {  // the state before the sequence's first position, then each position's raw column
        void* kq = kept_qk.data_ptr();
        for (int64_t c = 0; c < C; ++c) {
          if (pos == 0)
            for (int64_t t = 0; t < W; ++t) dt.put(kq, (b * C + c) * (W + S) + t, win[c * (W + 1) + t]);
          dt.put(kq, (b * C + c) * (W + S) + W + pos, r[c]);
        }
        for (int64_t i = 0; i < Hv; ++i) dt.put(kept_v.data_ptr(), (b * S + pos) * Hv + i, r[C + Hv + i]);
      }
      float* dwr = &dw[row * C * t1];
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < t1; ++t) {
          float s = win[c * (W + 1) + t] * k0p[c * t0];
          for (int64_t u = 1; u < t0; ++u) s += win[c * (W + 1) + t + u] * k0p[c * t0 + u];
          dwr[c * t1 + t] = s + b0p[c];
        }
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < W; ++t) dt.put(cs, c * W + t, win[c * (W + 1) + t + 1]);
      // value: [current half | the previous token's delayed half]; this token's delayed half is the state
      void* vd = static_cast<uint8_t*>(vdelay.data_ptr()) + slot * Hv * vdelay.element_size();
      for (int64_t i = 0; i < Hv; ++i) {
        v[i] = r[C + i];
        v[Hv + i] = dt.get(vd, i);
      }
      for (int64_t i = 0; i < Hv; ++i) dt.put(vd, i, r[C + Hv + i]);
      const int64_t wslot = ws.at(b, pos);
      TORCH_CHECK(wslot >= 0 && wslot < N, "zaya fused: write slot ", wslot, " out of range");
      wslots[row] = wslot;
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t d = 0; d < D; ++d) dt.put(kv.data_ptr(), ((1 * Hkv + g) * N + wslot) * D + d, v[g * D + d]);
    }
    // k1 is [group][input k][output o] in the weight dtype
    if constexpr (DT::bf) {
      conv_grouped_bf16(x.data(), dw.data(), static_cast<const uint16_t*>(k1.data_ptr()), R, G, D, D * t1);
    } else {
      conv_grouped_f32(x.data(), dw.data(), k1.data_ptr<float>(), R, G, D, D * t1);
    }
    const void* cosp = cos.data_ptr();
    const void* sinp = sin.data_ptr();
    std::vector<float> u(D), krot(KV);
    for (int64_t row = 0; row < R; ++row) {
      float* xr = &x[row * C];
      for (int64_t c = 0; c < C; ++c) xr[c] = dt.rd(xr[c] + b1p[c]);
      // query / key = conv output + the mix, L2-normalised to sqrt(D) (keys times temp), rotated
      auto finish = [&](int64_t n_heads, const float* mix, int64_t off, bool is_key, float* out) {
        for (int64_t hh = 0; hh < n_heads; ++hh) {
          for (int64_t d = 0; d < D; ++d) u[d] = dt.rd(xr[off + hh * D + d] + mix[hh * D + d]);
          float s = 0.0f;
  #pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) s += u[d] * u[d];
          const float nrm = std::max(dt.rd(std::sqrt(s)), eps_qk);
          const float f = dt.rd(dt.rd(1.0f / nrm) * scale_qk);
          for (int64_t d = 0; d < D; ++d) u[d] = dt.rd(u[d] * f);
          if (is_key) {
            const float tk = dt.get(temp.data_ptr(), hh);
            for (int64_t d = 0; d < D; ++d) u[d] = dt.rd(u[d] * tk);
          }
          const int64_t half = rot / 2;
          for (int64_t d = 0; d < rot; ++d) {
            const float rotated = d < half ? -u[d + half] : u[d - half];
            out[hh * D + d] =
                dt.rd(dt.rd(u[d] * dt.get(cosp, row * rot + d)) + dt.rd(rotated * dt.get(sinp, row * rot + d)));
          }
          for (int64_t d = rot; d < D; ++d) out[hh * D + d] = u[d];
        }
      };
      finish(Hq, &res[row * (Q + KV)], 0, false, &qrot[row * Q]);
      finish(Hkv, &res[row * (Q + KV) + Q], Q, true, krot.data());
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t d = 0; d < D; ++d) dt.put(kv.data_ptr(), ((0 * Hkv + g) * N + wslots[row]) * D + d, krot[g * D + d]);
    }
    for (int64_t i = 0; i < B * L; ++i) {
      const int64_t sl = rs.at(i / L, i % L);
      TORCH_CHECK(sl >= 0 && sl < N, "zaya fused: read slot ", sl, " out of range");
    }

    // attention: softmax(q k^T / sqrt(D)) v in fp32, per (row, kv head); its query heads share the keys
    at::Tensor o = at::empty({R, Q}, h.options().dtype(wst));
    const int64_t elem = kv.element_size();
    const uint8_t* kbase = static_cast<const uint8_t*>(kv.data_ptr());
    const uint8_t* vbase = kbase + Hkv * N * D * elem;
    const int64_t work = L * D * grp;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / std::max<int64_t>(1, work));
    at::parallel_for(0, R * Hkv, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> sc(L * grp), acc(D);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row = task / Hkv, g = task % Hkv, b = row / S;
        const float* q = &qrot[row * Q + g * grp * D];
        const int64_t* slots = rs.idx ? rs.idx + b * L : nullptr;
        const int64_t start = rs.start + b * L;
        if constexpr (DT::bf) {
          scores_bf16(sc.data(), q, grp, reinterpret_cast<const uint16_t*>(kbase) + g * N * D, slots, start, L, D);
        } else {
          scores_f32(sc.data(), q, grp, reinterpret_cast<const float*>(kbase) + g * N * D, slots, start, L, D);
        }
        for (int64_t j = 0; j < grp; ++j) {
          float* s = &sc[j * L];
          softmax_scaled(s, L, mk ? mk + row * L : nullptr, attn_scale);
          std::fill(acc.begin(), acc.end(), 0.0f);
          if constexpr (DT::bf) {
            values_bf16(acc.data(), s, reinterpret_cast<const uint16_t*>(vbase) + g * N * D, slots, start, L, D);
          } else {
            values_f32(acc.data(), s, reinterpret_cast<const float*>(vbase) + g * N * D, slots, start, L, D);
          }
          for (int64_t d = 0; d < D; ++d) dt.put(o.data_ptr(), row * Q + (g * grp + j) * D + d, acc[d]);
        }
      }
    });
    return {o, kept_qk, kept_v};
  };
  return is_bf16(norm_w) ? run(Dt<true>{}) : run(Dt<false>{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_moe(
    const at::Tensor& o, const at::Tensor& h, const std::optional<at::Tensor>& router_state,
    const c10::List<std::optional<at::Tensor>>& mats_t, at::IntArrayRef meta, const std::vector<at::Tensor>& vecs,
    double eps_post, double eps_router, int64_t num_experts) {
  auto run = [&](const auto& dt) -> std::tuple<at::Tensor, at::Tensor, at::Tensor> {
    using DT = std::decay_t<decltype(dt)>;
    // mats: o_proj, down_proj, fc1, fc2, out_proj, gate_up (stacked), down (stacked)
    // vecs: post-attention hb, hs, rb, rs; post-attention norm; router norm; router_states_scale;
    //       balancing biases (fp32); post-MLP hb, hs, rb, rs
    const std::vector<Mat> m = unpack_mats(mats_t, meta);
    TORCH_CHECK(m.size() == 7 && vecs.size() == 12, "zaya fused: fused_moe takes 7 matrices and 12 vectors");
    const at::ScalarType wst = vecs[4].scalar_type();
    TORCH_CHECK(h.dim() == 2 && h.scalar_type() == at::kFloat && h.is_contiguous(),
                "zaya fused: h must be (B, H) float32");
    TORCH_CHECK(o.scalar_type() == wst && o.dim() == 2, "zaya fused: o must be (B, Hq*D) in the weight dtype");
    const int64_t B = h.size(0), H = h.size(1), R = m[1].n;
    for (int i : {0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11}) {
      TORCH_CHECK(vecs[i].is_contiguous() && vecs[i].scalar_type() == wst, "zaya fused: vector ", i,
                  " must be contiguous in the weight dtype");
    }
    TORCH_CHECK(vecs[7].scalar_type() == at::kFloat && vecs[7].numel() == num_experts + 1,
                "zaya fused: balancing biases must be float32, one per class");
    const void* post_attn[4] = {vecs[0].data_ptr(), vecs[1].data_ptr(), vecs[2].data_ptr(), vecs[3].data_ptr()};
    const void* post_mlp[4] = {vecs[8].data_ptr(), vecs[9].data_ptr(), vecs[10].data_ptr(), vecs[11].data_ptr()};

    const at::Tensor y = apply(m[0], o.contiguous());
    std::vector<float> yr(H), h1(B * H), hr(H);
    at::Tensor x = at::empty({B, H}, h.options().dtype(wst));
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < H; ++i) yr[i] = dt.rd(y.data_ptr<float>()[b * H + i]);
      residual(dt, yr.data(), h.data_ptr<float>() + b * H, post_attn, H, &h1[b * H]);
      for (int64_t i = 0; i < H; ++i) hr[i] = dt.rd(h1[b * H + i]);
      rms_norm_row(dt, hr.data(), H, vecs[4].data_ptr(), static_cast<float>(eps_post), x.data_ptr(), b);
    }
    // router
    const at::Tensor r0 = apply(m[1], x);
    at::Tensor r = at::empty({B, R}, h.options().dtype(wst));
    at::Tensor rn = at::empty({B, R}, h.options().dtype(wst));
    const bool eda = router_state.has_value() && vecs[6].numel() == R;
    at::Tensor st;
    if (eda) {
      st = router_state->contiguous();
      TORCH_CHECK(st.scalar_type() == wst && st.numel() == B * R, "zaya fused: router state must be (B, R)");
    }
    std::vector<float> rrow(R);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t i = 0; i < R; ++i) {
        float v = dt.rd(r0.data_ptr<float>()[b * R + i]);
        if (eda) v = dt.rd(v + dt.rd(dt.get(st.data_ptr(), b * R + i) * dt.get(vecs[6].data_ptr(), i)));
        rrow[i] = v;
        dt.put(r.data_ptr(), b * R + i, v);
      }
      rms_norm_row(dt, rrow.data(), R, vecs[5].data_ptr(), static_cast<float>(eps_router), rn.data_ptr(), b);
    }
    auto rounded = [&](const at::Tensor& f) { return f.to(wst); };  // fp32 sums (+ bias) -> the weight dtype
    auto gelu = [&](const at::Tensor& f) {  // fp32 sums (+ bias) -> rounded -> GELU -> rounded
      if constexpr (!DT::bf) return at::gelu(f);
      at::Tensor out = at::empty(f.sizes(), f.options().dtype(wst));
      const float* src = f.data_ptr<float>();
      for (int64_t i = 0; i < f.numel(); ++i) dt.put(out.data_ptr(), i, gelu_aten(dt.rd(src[i])));
      return out;
    };
    const at::Tensor g1 = gelu(apply(m[2], rn));
    const at::Tensor g2 = gelu(apply(m[3], g1));
    const at::Tensor probs = at::softmax(rounded(apply(m[4], g2)), -1);
    at::Tensor biased = probs.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);  // never probs itself
    {
      float* bp = biased.data_ptr<float>();
      const float* bb = vecs[7].data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t e = 0; e <= num_experts; ++e) bp[b * (num_experts + 1) + e] += bb[e];
    }
    const at::Tensor index = std::get<1>(at::topk(biased, 1, -1)).reshape({B}).contiguous();
    // the expert: silu(gate) * up, down, times the gate probability; skip rows give zeros
    at::Tensor expert = index.clone();
    const int64_t* ip = index.data_ptr<int64_t>();
    int64_t* ep = expert.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) ep[b] = ip[b] < num_experts ? ip[b] : -1;
    const at::Tensor gu = rounded(apply(m[5], x, expert));  // (B, 2I)
    const int64_t I = gu.size(1) / 2;
    const at::Tensor act = at::silu(gu.narrow(1, 0, I));
    at::Tensor hidden = at::empty({B, I}, h.options().dtype(wst));
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < I; ++i)
        dt.put(hidden.data_ptr(), b * I + i,
               dt.get(act.data_ptr(), b * I + i) * dt.get(gu.data_ptr(), b * 2 * I + I + i));
    const at::Tensor dn = apply(m[6], hidden, expert);  // (B, H) fp32 sums
    at::Tensor h2 = at::empty({B, H}, h.options());
    for (int64_t b = 0; b < B; ++b) {
      const float gate = dt.get(probs.data_ptr(), b * (num_experts + 1) + ip[b]);
      for (int64_t i = 0; i < H; ++i) yr[i] = dt.rd(dt.rd(dn.data_ptr<float>()[b * H + i]) * gate);
      residual(dt, yr.data(), &h1[b * H], post_mlp, H, h2.data_ptr<float>() + b * H);
    }
    return {h2, r, index};
  };
  return is_bf16(vecs.at(4)) ? run(Dt<true>{}) : run(Dt<false>{});
}

}  // namespace
}  // namespace zaya_kernels

TORCH_LIBRARY_FRAGMENT(zaya, m) {
  m.def("fused_attention(Tensor h, Tensor norm_w, float eps, Tensor?[] qkv, int[] qkv_meta, Tensor conv_k0, "
        "Tensor conv_b0, Tensor conv_k1, Tensor conv_b1, Tensor temp, Tensor cos, Tensor sin, Tensor(a!) conv, "
        "Tensor(b!) vdelay, Tensor? state, int state0, Tensor(c!) kv, Tensor? write, int write0, Tensor? read, "
        "int read0, int L, Tensor? mask, int num_heads, int num_kv_heads, int head_dim, int S, bool keep) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("fused_moe(Tensor o, Tensor h, Tensor? router_state, Tensor?[] mats, int[] meta, Tensor[] vecs, "
        "float eps_post, float eps_router, int num_experts) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(zaya, CPU, m) {
  m.impl("fused_attention", &zaya_kernels::fused_attention);
  m.impl("fused_moe", &zaya_kernels::fused_moe);
}
