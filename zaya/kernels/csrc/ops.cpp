// torch.ops.zaya.*: argument checks, activation preparation and the choice of inner loop.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "kernels.h"

namespace zaya_kernels {
namespace {

bool initial_avx512() {
  const char* env = std::getenv("ZAYA_KERNELS_ISA");
  return avx512_supported() && !(env && std::string(env) == "portable");
}

std::atomic<bool> g_avx512{initial_avx512()};

std::string isa(const std::string& set) {
  if (set == "avx512") {
    TORCH_CHECK(avx512_supported(), "zaya kernels: this CPU lacks AVX-512 BF16/VNNI/VBMI");
    g_avx512 = true;
  } else if (set == "portable") {
    g_avx512 = false;
  } else {
    TORCH_CHECK(set.empty(), "zaya kernels: isa must be 'avx512', 'portable' or '' (query), got '", set, "'");
  }
  return g_avx512 ? "avx512" : "portable";
}

// What a 4-bit value table allows: exact bf16 products (path B) and int8 activations (path C,
// values that are small integers after a power-of-two scale p).
struct Lut {
  float f32[16];
  uint16_t bf16[32];
  uint8_t u8[16];
  bool bf16_exact = true, has_int = false, identity_u8 = true;
  int32_t offset = 0;  // added to every integer value so the table is unsigned
  float inv_p = 1.0f;
};

Lut analyze_lut(const at::Tensor& lut) {
  TORCH_CHECK(lut.scalar_type() == at::kFloat && lut.numel() == 16 && lut.is_contiguous(),
              "zaya kernels: lut must be 16 contiguous float32 values, got ", lut.scalar_type(), " ", lut.sizes());
  Lut t;
  const float* v = lut.data_ptr<float>();
  for (int i = 0; i < 16; ++i) {
    t.f32[i] = v[i];
    t.bf16[i] = t.bf16[i + 16] = f32_to_bf16(v[i]);
    t.bf16_exact = t.bf16_exact && bf16_to_f32(t.bf16[i]) == v[i];
  }
  for (int e = 0; e <= 8 && !t.has_int; ++e) {
    const float p = std::ldexp(1.0f, e);
    float lo = 0, hi = 0;
    bool ints = true;
    for (int i = 0; i < 16; ++i) {
      const float s = v[i] * p;
      ints = ints && std::isfinite(s) && s == std::nearbyint(s);
      lo = std::min(lo, s);
      hi = std::max(hi, s);
    }
    if (!ints || hi - lo > 255) continue;
    t.has_int = true;
    t.offset = static_cast<int32_t>(-lo);
    t.inv_p = 1.0f / p;
    for (int i = 0; i < 16; ++i) {
      t.u8[i] = static_cast<uint8_t>(static_cast<int32_t>(v[i] * p) + t.offset);
      t.identity_u8 = t.identity_u8 && t.u8[i] == i;
    }
  }
  return t;
}

struct Rows {  // x rows grouped by expert
  std::vector<int64_t> order, seg_expert, seg_begin;
  std::vector<int64_t> skipped;  // rows whose expert is negative: their output is zero
};

Rows group_rows(int64_t M, const std::optional<at::Tensor>& expert, int64_t E) {
  Rows r;
  if (!expert) {
    r.order.resize(M);
    std::iota(r.order.begin(), r.order.end(), 0);
    r.seg_expert = {0};
    r.seg_begin = {0, M};
    return r;
  }
  const at::Tensor& e = *expert;
  TORCH_CHECK(e.dim() == 1 && e.size(0) == M && (e.scalar_type() == at::kLong || e.scalar_type() == at::kInt),
              "zaya kernels: expert must be an int64/int32 vector of one index per row (", M, "), got ",
              e.scalar_type(), " ", e.sizes());
  const at::Tensor ec = e.to(at::kLong).contiguous();
  const int64_t* ev = ec.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> byexp;
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(ev[m] < E, "zaya kernels: row ", m, " asks for expert ", ev[m], " of ", E);
    if (ev[m] < 0) {
      r.skipped.push_back(m);
    } else {
      byexp.emplace_back(ev[m], m);
    }
  }
  std::stable_sort(byexp.begin(), byexp.end(), [](auto& a, auto& b) { return a.first < b.first; });
  for (size_t i = 0; i < byexp.size(); ++i) {
    if (i == 0 || byexp[i].first != byexp[i - 1].first) {
      r.seg_expert.push_back(byexp[i].first);
      r.seg_begin.push_back(static_cast<int64_t>(i));
    }
    r.order.push_back(byexp[i].second);
  }
  r.seg_begin.push_back(static_cast<int64_t>(byexp.size()));
  return r;
}

// Activation buffers, reused across calls of a thread.
struct Scratch {
  std::vector<uint8_t> x;
  std::vector<float> xd, xsum;
  std::vector<int32_t> xcorr;
  std::vector<const void*> src;
};

void prepare_x(Problem& p, Scratch& s, const at::Tensor& x, const Rows& rows, const Lut* lut, bool avx512) {
  const int64_t R = static_cast<int64_t>(rows.order.size()), K = x.size(1);
  XPrep a{};
  a.fmt = p.fmt;
  a.path = p.path;
  a.k = K;
  a.kp = p.kp;
  a.rows = R;
  a.group = p.group;
  a.ngroups = p.ngroups;
  a.flush = p.flush;
  a.src_bf16 = x.scalar_type() == at::kBFloat16;
  s.src.resize(R);
  const uint8_t* base = static_cast<const uint8_t*>(x.data_ptr());
  for (int64_t i = 0; i < R; ++i) s.src[i] = base + rows.order[i] * K * x.element_size();
  a.src = s.src.data();
  const bool u4 = p.fmt == Fmt::U4;
  a.offset = u4 && lut ? lut->offset : 128;
  a.inv_p = u4 && lut ? lut->inv_p : 1.0f;
  const int64_t elem = p.path == Path::A ? 4 : p.path == Path::B ? 2 : 1;
  s.x.resize(R * p.kp * elem + 64);
  a.x = s.x.data();
  if (p.path == Path::C) {
    s.xd.resize(p.kp / kActBlock * R);
    s.xcorr.resize(p.kp / p.flush * R);
    a.xd = s.xd.data();
    a.xcorr = s.xcorr.data();
  }
  if (p.mins) {
    s.xsum.resize(p.ngroups * R);
    a.xsum = s.xsum.data();
  }
  if (avx512) {
    prepare_avx512(a);
  } else {
    prepare_portable(a);
  }
  if (p.path == Path::A && p.fmt == Fmt::INT8) {
    const float* xf = static_cast<const float*>(a.x);
    float amax = 0;
    for (int64_t i = 0; i < R * p.kp; ++i) amax = std::max(amax, std::fabs(xf[i]));
    p.x_small = amax < 0x1p64f;  // false for inf and NaN too
  }
  p.rows = R;
  p.x = a.x;
  p.xd = a.xd;
  p.xcorr = a.xcorr;
  p.xsum = a.xsum;
}

void check_scales(const at::Tensor& t, const char* name, const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "zaya kernels: ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(t.sizes().vec() == shape && t.is_contiguous(), "zaya kernels: ", name,
              " must be contiguous with shape ", at::IntArrayRef(shape), " (experts?, n-blocks, groups, 16), got ",
              t.sizes());
}

// The weight's shape, groups, scales and mins, checked against x (K columns) and n.
Problem describe_weight(Fmt fmt, int64_t K, const at::Tensor& w, const at::Tensor* scales, const at::Tensor* mins,
                        int64_t n, int64_t group, bool experts) {
  const at::ScalarType wdt = fmt == Fmt::BF16 ? at::kBFloat16 : fmt == Fmt::INT8 ? at::kChar : at::kByte;
  const int64_t lead = experts ? 1 : 0, esize = fmt == Fmt::BF16 ? 2 : 4;
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == wdt && w.dim() == 4 + lead && w.size(lead + 2) == kLanes &&
                  w.size(lead + 3) == esize && w.is_contiguous(),
              "zaya kernels: weight must be a contiguous CPU ", wdt, " tensor (", experts ? "experts, " : "",
              "n-blocks, units, 16, ", esize, "), got ", w.scalar_type(), " ", w.sizes());
  Problem p{};
  p.fmt = fmt;
  p.n = n;
  p.nb = w.size(lead);
  p.kp = w.size(lead + 1) * k_per_unit(fmt);
  TORCH_CHECK(n > (p.nb - 1) * kLanes && n <= p.nb * kLanes, "zaya kernels: n=", n, " does not fit ", p.nb,
              " blocks of 16 rows");
  TORCH_CHECK(p.kp % 32 == 0 && p.kp >= K && p.kp - K < 32, "zaya kernels: x has ", K,
              " columns but the weight was packed for ", p.kp, " (K rounded up to 32)");
  if (group <= 0 || group >= K) {
    p.group = p.kp;
  } else {
    TORCH_CHECK(K % group == 0 && (group == 16 || group % 32 == 0),
                "zaya kernels: group ", group, " must divide K=", K, " and be 16 or a multiple of 32");
    p.group = group;
  }
  p.ngroups = p.kp / p.group;
  p.flush = p.group == 16 ? 16 : 32;
  p.w = static_cast<const uint8_t*>(w.data_ptr());
  p.w_expert_stride = experts ? w.stride(0) * w.element_size() : 0;
  const std::vector<int64_t> sshape = experts ? std::vector<int64_t>{w.size(0), p.nb, p.ngroups, kLanes}
                                              : std::vector<int64_t>{p.nb, p.ngroups, kLanes};
  if (scales) {
    check_scales(*scales, "scales", sshape);
    p.scales = scales->data_ptr();
    p.scale_type = scales->scalar_type() == at::kFloat  ? ScaleType::F32
                   : scales->scalar_type() == at::kHalf ? ScaleType::F16
                                                        : ScaleType::BF16;
    p.s_expert_stride = p.nb * p.ngroups * kLanes;
  }
  if (mins) {
    check_scales(*mins, "mins", sshape);
    TORCH_CHECK(mins->scalar_type() == scales->scalar_type(), "zaya kernels: mins and scales must share a dtype");
    p.mins = mins->data_ptr();
  }
  return p;
}

// A (fp32), B (bf16 pairs: bf16 activations, exact on this format and table) or C (int8 activations).
Path choose_path(Fmt fmt, bool act_int8, const std::optional<Lut>& lut, bool bf16_x, bool avx512) {
  if (act_int8) {
    TORCH_CHECK(fmt == Fmt::INT8 || fmt == Fmt::U4, "zaya kernels: int8 activations apply to int8 and 4-bit weights");
    TORCH_CHECK(!lut || lut->has_int, "zaya kernels: int8 activations need a value table of integers in a range of "
                                      "256 after a power-of-two scale (identity, q - 8, e2m1 are)");
    return Path::C;
  }
  const bool b_ok = fmt == Fmt::BF16 || fmt == Fmt::FP8 || (fmt == Fmt::U4 && lut->bf16_exact);
  return avx512 && b_ok && bf16_x ? Path::B : Path::A;
}

at::Tensor matvec(Fmt fmt, const at::Tensor& x_in, const at::Tensor& w, const at::Tensor* scales,
                  const at::Tensor* mins, const at::Tensor* lut_t, int64_t n, int64_t group, bool act_int8,
                  const std::optional<at::Tensor>& expert, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.dim() == 2 &&
                  (x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16),
              "zaya kernels: x must be a 2-D float32 or bfloat16 CPU tensor, got ", x_in.scalar_type(), " ",
              x_in.sizes());
  const at::ScalarType odt = out_dtype.value_or(x_in.scalar_type());
  TORCH_CHECK(odt == at::kFloat || odt == at::kBFloat16, "zaya kernels: out_dtype must be float32 or bfloat16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0);
  Problem p = describe_weight(fmt, x.size(1), w, scales, mins, n, group, expert.has_value());
  std::optional<Lut> lut;
  if (lut_t) {
    lut = analyze_lut(*lut_t);
    p.lut_f32 = lut->f32;
    p.lut_bf16 = lut->bf16;
    p.lut_u8 = lut->u8;
    p.lut_identity_u8 = lut->identity_u8;
  }
  const bool avx512 = g_avx512;
  p.path = choose_path(fmt, act_int8, lut, x.scalar_type() == at::kBFloat16, avx512);
  const Rows rows = group_rows(M, expert, expert ? w.size(0) : 1);
  thread_local Scratch scratch;
  prepare_x(p, scratch, x, rows, lut ? &*lut : nullptr, avx512);
  at::Tensor out = at::empty({M, n}, x.options().dtype(odt));
  for (int64_t r : rows.skipped) out[r].zero_();
  p.nseg = static_cast<int>(rows.seg_expert.size());
  p.seg_expert = rows.seg_expert.data();
  p.seg_begin = rows.seg_begin.data();
  p.out_row = rows.order.data();
  p.out = out.data_ptr();
  p.out_bf16 = odt == at::kBFloat16;
  p.ldo = n;
  if (rows.order.empty()) return out;
  if (avx512) {
    run_avx512(p);
  } else {
    run_portable(p);
  }
  return out;
}

using Expert = std::optional<at::Tensor>;
using OutDtype = std::optional<at::ScalarType>;

at::Tensor mv_bf16(const at::Tensor& x, const at::Tensor& w, int64_t n, const Expert& expert, OutDtype out_dtype) {
  return matvec(Fmt::BF16, x, w, nullptr, nullptr, nullptr, n, 0, false, expert, out_dtype);
}

at::Tensor mv_int8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const std::optional<at::Tensor>& mins, int64_t n, int64_t group, bool act_int8,
                   const Expert& expert, OutDtype out_dtype) {
  return matvec(Fmt::INT8, x, w, &scales, mins ? &*mins : nullptr, nullptr, n, group, act_int8, expert, out_dtype);
}

at::Tensor mv_4bit(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const std::optional<at::Tensor>& mins, const at::Tensor& lut, int64_t n, int64_t group,
                   bool act_int8, const Expert& expert, OutDtype out_dtype) {
  return matvec(Fmt::U4, x, w, &scales, mins ? &*mins : nullptr, &lut, n, group, act_int8, expert, out_dtype);
}

at::Tensor mv_fp8(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales, int64_t n, int64_t group,
                  const Expert& expert, OutDtype out_dtype) {
  return matvec(Fmt::FP8, x, w, &scales, nullptr, nullptr, n, group, false, expert, out_dtype);
}

// Reads every byte of t once (the memory-read roofline the benchmarks compare the kernels with).
at::Tensor read_all(const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && (t.numel() * t.element_size()) % 256 == 0,
              "zaya kernels: read_all takes a contiguous CPU tensor of a multiple of 256 bytes");
  const uint8_t* p = static_cast<const uint8_t*>(t.data_ptr());
  const int64_t bytes = t.numel() * t.element_size();
  const uint64_t v = g_avx512 ? read_all_avx512(p, bytes) : read_all_portable(p, bytes);
  at::Tensor out = at::empty({1}, t.options().dtype(at::kLong));
  out.data_ptr<int64_t>()[0] = static_cast<int64_t>(v);
  return out;
}

}  // namespace

// The matrix-vector entry point for the fused operators (fused.cpp).
at::Tensor fused_matvec(Fmt fmt, const at::Tensor& x, const at::Tensor& w, const at::Tensor* scales,
                        const at::Tensor* mins, const at::Tensor* lut, int64_t n, int64_t group, bool act_int8,
                        const std::optional<at::Tensor>& expert, std::optional<at::ScalarType> out_dtype) {
  return matvec(fmt, x, w, scales, mins, lut, n, group, act_int8, expert, out_dtype);
}

}  // namespace zaya_kernels

TORCH_LIBRARY(zaya, m) {
  m.def("mv_bf16(Tensor x, Tensor w, int n, Tensor? expert=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("mv_int8(Tensor x, Tensor w, Tensor scales, Tensor? mins, int n, int group, bool act_int8=False, "
        "Tensor? expert=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("mv_4bit(Tensor x, Tensor w, Tensor scales, Tensor? mins, Tensor lut, int n, int group, "
        "bool act_int8=False, Tensor? expert=None, ScalarType? out_dtype=None) -> Tensor");
  m.def("mv_fp8(Tensor x, Tensor w, Tensor scales, int n, int group, Tensor? expert=None, "
        "ScalarType? out_dtype=None) -> Tensor");
  m.def("isa(str set='') -> str", &zaya_kernels::isa);
  m.def("read_all(Tensor t) -> Tensor");
}

TORCH_LIBRARY_IMPL(zaya, CPU, m) {
  m.impl("mv_bf16", &zaya_kernels::mv_bf16);
  m.impl("mv_int8", &zaya_kernels::mv_int8);
  m.impl("mv_4bit", &zaya_kernels::mv_4bit);
  m.impl("mv_fp8", &zaya_kernels::mv_fp8);
  m.impl("read_all", &zaya_kernels::read_all);
}
