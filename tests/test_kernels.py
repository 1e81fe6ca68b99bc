"""zaya.kernels: layouts against the formats' own dequantization, the compiled kernels against
dequantize-to-fp32-then-matmul, torch.compile tracing, and the fallback without a compiler."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import zaya.kernels as zk
from zaya.kernels import build, convert, reference
from zaya.kernels.layouts import padded_k

# (fmt, n, k, group, mins, scale dtype, lut): ragged K where the format allows it, odd N
CASES = [
    ("bf16", 37, 100, 0, False, None, None),
    ("bf16", 48, 2048, 0, False, None, None),
    ("int8", 37, 100, 0, False, torch.bfloat16, None),        # per channel, K not a multiple of 32
    ("int8", 33, 96, 32, False, torch.float16, None),         # Q8_0
    ("int8", 19, 64, 16, False, torch.float32, None),         # Q6_K groups
    ("int8", 21, 128, 32, True, torch.float32, None),         # Q5_K: offset per group
    ("4bit", 37, 128, 32, True, torch.float32, zk.IDENTITY),  # Q4_K
    ("4bit", 35, 192, 64, True, torch.bfloat16, zk.ZAYA_INT4),
    ("4bit", 17, 96, 32, False, torch.bfloat16, zk.E2M1),     # MXFP4
    ("4bit", 23, 50, 0, True, torch.float32, tuple(0.1 * i - 0.7 for i in range(16))),  # any table, ragged K
    ("fp8", 37, 100, 0, False, torch.float32, None),          # per row
    ("fp8", 40, 256, 128, False, torch.bfloat16, None),       # 128-column blocks
]
IDS = [f"{c[0]}-{c[1]}x{c[2]}-g{c[3]}{'-min' if c[4] else ''}" for c in CASES]


def make(fmt, n, k, group=0, mins=False, sdt=None, lut=None, experts=None, seed=0):
    """A random KernelWeight and the fp32 weight its format defines, computed without the layout code."""
    g = torch.Generator().manual_seed(seed)
    lead = (experts,) if experts else ()
    if fmt == "bf16":
        w = torch.randn(*lead, n, k, generator=g).bfloat16()
        return zk.pack_bf16(w, experts=bool(experts)), w.float()
    ng = 1 if group == 0 else k // group
    s = (torch.rand(*lead, n, ng, generator=g) * 0.02 + 0.001).to(sdt)
    m = (torch.randn(*lead, n, ng, generator=g) * 0.01).to(sdt) if mins else None
    expand = lambda t: t.float().repeat_interleave(group or k, -1)[..., :k]  # noqa: E731
    offset = 0 if m is None else expand(m)
    if fmt == "int8":
        q = torch.randint(-128, 128, (*lead, n, k), generator=g, dtype=torch.int8)
        return zk.pack_int8(q, s, group=group, mins=m, experts=bool(experts)), q.float() * expand(s) + offset
    if fmt == "4bit":
        q = torch.randint(0, 16, (*lead, n, k), generator=g, dtype=torch.uint8)
        table = torch.tensor(lut, dtype=torch.float32)
        kw = zk.pack_4bit(zk.pack_nibbles(q), k, s, table, group=group, mins=m, experts=bool(experts))
        return kw, table[q.long()] * expand(s) + offset
    w8 = (torch.randn(*lead, n, k, generator=g) * 40).to(torch.float8_e4m3fn)
    block = (1, group) if group else None
    return zk.pack_fp8(w8, s, block=block, experts=bool(experts)), w8.float() * expand(s)


def bound(x, w):
    """fp32 summation-order error allowance: 1e-5 of sum |x| |w| per output."""
    return 1e-5 * (x.float().abs() @ w.abs().transpose(-1, -2)) + 1e-30


@pytest.fixture
def kernels():
    if not zk.available():
        pytest.skip(f"compiled kernels unavailable: {zk.unavailable_reason()}")


@pytest.fixture(params=["avx512", "portable"])
def isa(request, kernels):
    if request.param == "avx512" and not _has_avx512():
        pytest.skip("this CPU lacks AVX-512 BF16/VNNI/VBMI")
    before = torch.ops.zaya.isa()
    torch.ops.zaya.isa(request.param)
    yield request.param
    torch.ops.zaya.isa(before)


def _has_avx512() -> bool:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return all(f in flags for f in ("avx512_bf16", "avx512_vnni", "avx512vbmi", "avx512bw"))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_layout_dequantizes_exactly(case):
    kw, w = make(*case)
    assert torch.equal(kw.dequantize(), w)
    kw, w = make(*case, experts=3)
    assert torch.equal(kw.dequantize(), w)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_take_rows_reads_the_layout(case):
    kw, w = make(*case)
    ids = torch.tensor([[0, case[1] - 1], [case[1] // 2, 5]])
    assert torch.equal(zk.take_rows(kw, ids), w[ids])


@pytest.mark.parametrize("case", CASES[::3], ids=IDS[::3])
def test_reference_matches_dense(case):
    kw, w = make(*case)
    x = torch.randn(3, case[2])
    assert (reference.matmul(x, kw) - x @ w.T).abs().le(bound(x, w)).all()


@pytest.mark.parametrize("rows", [1, 3, 8, 16])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kernel_matches_reference(case, rows, isa):
    kw, w = make(*case)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(rows, case[2]).to(dtype)
        y = zk.matmul(x, kw, out_dtype=torch.float32)
        assert (y - x.float() @ w.T).abs().le(bound(x, w)).all(), dtype
    if kw.supports_act_int8:
        x = torch.randn(rows, case[2]).bfloat16()
        y = zk.matmul(x, kw, act_int8=True, out_dtype=torch.float32)
        r = reference.matmul(x, kw, act_int8=True, out_dtype=torch.float32)
        assert (y - r).abs().le(bound(x, w)).all()


@pytest.mark.parametrize("case", [CASES[3], CASES[7], CASES[11]], ids=[IDS[3], IDS[7], IDS[11]])
def test_experts_pick_rows_and_skip(case, isa):
    kw, w = make(*case, experts=4)
    x = torch.randn(7, case[2]).bfloat16()
    expert = torch.tensor([2, 0, -1, 2, 3, 2, -1])
    y = zk.matmul(x, kw, expert=expert, out_dtype=torch.float32)
    for m, e in enumerate(expert.tolist()):
        if e < 0:
            assert torch.equal(y[m], torch.zeros(case[1]))
        else:
            assert (y[m] - w[e] @ x[m].float()).abs().le(bound(x[m], w[e])).all()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_many_n_blocks_and_rows_sum_as_one_row_alone(case, isa):
    """Tiles of several n-blocks side by side (few rows) and their remainders: every row matches the
    reference and is bit-identical to the same row multiplied alone, whatever batch it is in."""
    fmt, _, k, *rest = case
    kw, w = make(fmt, 16 * 11 + 5, k, *rest)  # 12 n-blocks, the last one ragged
    xs = torch.randn(11, k)
    for dtype in (torch.bfloat16, torch.float32):
        x = xs.to(dtype)
        modes = [False, True] if kw.supports_act_int8 and dtype == torch.bfloat16 else [False]
        for act_int8 in modes:
            alone = torch.cat([zk.matmul(x[m:m + 1], kw, act_int8=act_int8, out_dtype=torch.float32)
                               for m in range(len(x))])
            if not act_int8:
                assert (alone - x.float() @ w.T).abs().le(bound(x, w)).all(), dtype
            for rows in (2, 3, 4, 5, 8, 11):
                y = zk.matmul(x[:rows], kw, act_int8=act_int8, out_dtype=torch.float32)
                assert torch.equal(y, alone[:rows]), (dtype, act_int8, rows)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[7]], ids=[IDS[1], IDS[3], IDS[7]])
def test_experts_over_many_n_blocks(case, isa):
    fmt, _, k, *rest = case
    kw, w = make(fmt, 16 * 9 + 3, k, *rest, experts=3)
    x = torch.randn(6, k).bfloat16()
    expert = torch.tensor([1, -1, 1, 0, 2, 1])
    y = zk.matmul(x, kw, expert=expert, out_dtype=torch.float32)
    for m, e in enumerate(expert.tolist()):
        if e < 0:
            assert torch.equal(y[m], torch.zeros(kw.n))
        else:
            assert (y[m] - w[e] @ x[m].float()).abs().le(bound(x[m], w[e])).all()
            one = zk.matmul(x[m:m + 1], kw, expert=expert[m:m + 1], out_dtype=torch.float32)
            assert torch.equal(y[m], one[0])


@pytest.mark.parametrize("case", CASES[2:6], ids=IDS[2:6])
def test_int8_loops_for_small_and_huge_activations_agree_bit_for_bit(case, isa):
    """int8 weights, exact loop: activations below 2^64 take the byte-shuffle widening (sums 2^24
    times larger), larger ones the shifts; scaling x by 2^70 switches loops and scales y exactly."""
    kw, w = make(case[0], 16 * 11 + 5, *case[2:])
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 3, 8):
            x = torch.randn(rows, case[2]).to(dtype)
            small = zk.matmul(x, kw, out_dtype=torch.float32)
            huge = zk.matmul(x * 2.0**70, kw, out_dtype=torch.float32)
            assert torch.equal(huge * 2.0**-70, small), (dtype, rows)
            assert (small - x.float() @ w.T).abs().le(bound(x, w)).all()


def test_bf16_output_is_the_rounded_fp32_output(kernels):
    kw, _ = make("4bit", 35, 192, 64, True, torch.bfloat16, zk.ZAYA_INT4)
    x = torch.randn(4, 192).bfloat16()
    assert torch.equal(zk.matmul(x, kw), zk.matmul(x, kw, out_dtype=torch.float32).bfloat16())


def test_one_hot_rows_read_every_code_exactly(isa):
    """A one-hot activation row returns a weight column: every fp8 / 4-bit code decodes exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[codes & 0x7F != 0x7F]  # the 254 e4m3 values that are not NaN
    w8 = torch.stack([codes.roll(17 * i) for i in range(16)]).view(torch.float8_e4m3fn)
    kw = zk.pack_fp8(w8, torch.ones(16))
    x = torch.zeros(16, 254)
    x[torch.arange(16), torch.arange(0, 254, 16)] = 1
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(zk.matmul(x.to(dtype), kw, out_dtype=torch.float32), x @ w8.float().T)
    q = torch.stack([torch.arange(32, dtype=torch.uint8).roll(i) % 16 for i in range(16)])
    kw4 = zk.pack_4bit(zk.pack_nibbles(q), 32, torch.ones(16, 1), zk.E2M1)
    x = torch.eye(32)[::2]
    assert torch.equal(zk.matmul(x.bfloat16(), kw4, out_dtype=torch.float32), x @ kw4.dequantize().T)


def test_int8_activations_error_is_small(kernels):
    """llama.cpp-style int8 activations change the result by the activations' rounding only."""
    kw, w = make("int8", 256, 2048, 32, False, torch.float16)
    x = torch.randn(8, 2048)
    exact = x @ w.T
    err = (zk.matmul(x, kw, act_int8=True) - exact).norm() / exact.norm()
    assert 1e-4 < err < 1e-2  # nonzero (the rounding is real) and at the level of a 8-bit mantissa


def test_torch_compile_traces_without_graph_breaks(kernels):
    ws = [make(*CASES[i])[0] for i in (0, 3, 7, 10)]
    experts, _ = make(*CASES[6], experts=3)

    def step(x, e):
        out = [zk.matmul(x[:, :w.k], w) for w in ws]
        out.append(zk.matmul(x[:, :128], experts, expert=e, act_int8=True))
        return out

    x, e = torch.randn(2, 2048).bfloat16(), torch.tensor([1, -1])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, e), step(x, e)):
        assert torch.equal(a, b)


def test_bad_inputs_are_named(kernels):
    kw, _ = make("int8", 33, 96, 32, False, torch.float16)
    with pytest.raises(ValueError, match="columns"):
        zk.matmul(torch.randn(1, 95), kw)
    with pytest.raises(ValueError, match="act_int8"):
        zk.matmul(torch.randn(1, 100), make(*CASES[0])[0], act_int8=True)
    odd, _ = make(*CASES[9])
    with pytest.raises(RuntimeError, match="value table of integers"):
        zk.matmul(torch.randn(1, 50), odd, act_int8=True)
    stacked, _ = make(*CASES[3], experts=2)
    with pytest.raises(RuntimeError, match="expert 5 of 2"):
        zk.matmul(torch.randn(1, 96), stacked, expert=torch.tensor([5]))
    with pytest.raises(ValueError, match="group 48 must divide"):
        zk.pack_int8(torch.zeros(4, 96, dtype=torch.int8), torch.ones(4, 2), group=48)
    with pytest.raises(RuntimeError, match="x has 64 columns but the weight was packed for 96"):
        torch.ops.zaya.mv_int8(torch.randn(1, 64), kw.data, kw.scales, None, 33, 32)


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch, zaya.kernels as zk\n"
            "warnings.simplefilter('always')\n"
            "w = zk.pack_int8(torch.ones(3, 40, dtype=torch.int8), torch.ones(3, 1))\n"
            "print(zk.available(), zk.available(), zk.unavailable_reason())\n"
            "print(zk.matmul(torch.ones(2, 40), w).tolist())\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), ZAYA_KERNELS_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("False False") and "no-such-compiler" in lines[0]
    assert lines[1] == str([[40.0] * 3] * 2)
    assert out.stderr.count("compiled kernels unavailable") == 1


def test_build_key_follows_sources_and_flags(monkeypatch):
    key = build.build_key()
    monkeypatch.setattr(build, "CFLAGS", build.CFLAGS + ("-DEXTRA",))
    assert build.build_key() != key


# ------------------------------------------------------------------ formats mapped exactly
@pytest.mark.parametrize("name", sorted(convert.GGUF_BLOCK))
def test_gguf_blocks_dequantize_as_gguf_does(name):
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    per, size = convert.GGUF_BLOCK[name]
    rng = np.random.default_rng(0)
    k = 512
    raw = rng.integers(0, 256, (2, 5, k // per * size), dtype=np.uint8)
    halves = {"Q4_K": slice(0, 4), "Q5_K": slice(0, 4), "Q6_K": slice(208, 210)}.get(name, slice(0, 2))
    blocks = raw.reshape(2, 5, k // per, size)
    n_half = (halves.stop - halves.start) // 2
    blocks[..., halves] = rng.uniform(-1, 1, (2, 5, k // per, n_half)).astype(np.float16).view(np.uint8)
    ref = gguf.quants.dequantize(raw.reshape(10, -1), getattr(gguf.GGMLQuantizationType, name)).reshape(2, 5, k)
    ours = convert.from_gguf(torch.from_numpy(raw), name, k, experts=True).dequantize()
    assert torch.equal(ours, torch.from_numpy(ref))


def test_zaya_formats_dequantize_as_zaya_does():
    from zaya.quant import QuantSpec, dequantize, quantize_tensor

    w = torch.randn(3, 40, 128)
    q, s = quantize_tensor(w, QuantSpec(8), torch.bfloat16)
    assert torch.equal(convert.from_zaya_int8(q, s, experts=True).dequantize(), dequantize(q, s))
    q, s, z = quantize_tensor(w, QuantSpec(4, 32), torch.bfloat16)
    assert torch.equal(convert.from_zaya_int4(q, s, z, experts=True).dequantize(), dequantize(q, s, z))


def test_mxfp4_scales_are_powers_of_two_including_the_extremes():
    e = torch.tensor([[0, 1, 126, 127, 128, 254, 255, 100]], dtype=torch.uint8)
    codes = torch.arange(16, dtype=torch.uint8).repeat(1, 16)
    kw = convert.from_mxfp4(zk.pack_nibbles(codes), e)
    scale = torch.ldexp(torch.ones(8, dtype=torch.float64), e[0].double() - 127).float()
    scale[6] = float("nan")
    want = torch.tensor(zk.E2M1).repeat(16) * scale.repeat_interleave(32)
    assert torch.equal(kw.dequantize()[0].isnan(), want.isnan())
    assert torch.equal(kw.dequantize()[0].nan_to_num(), want.nan_to_num())
    assert padded_k(kw.k) == 256


def test_read_all_reads_every_word(isa):
    t = torch.randint(0, 256, (3 << 16,), dtype=torch.uint8)
    words = t.view(torch.int64)
    want = 0
    for v in words.tolist():
        want ^= v
    assert torch.ops.zaya.read_all(t).item() == want
