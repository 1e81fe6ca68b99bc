"""zaya.kernels.Matmul, the one rule for multiplying by a packed weight at any row count, and the
helpers that build packed weights a block or an expert at a time."""

from __future__ import annotations

import pytest
import torch

import zaya.kernels as zk
from tests.test_kernels import make
from zaya.kernels import convert, reference
from zaya.kernels.matrix import EXACT_ROWS
from zaya.model import ZayaExperts

FORMATS = {  # name -> make() arguments
    "bf16": ("bf16", 40, 96),
    "int8": ("int8", 40, 96, 0, False, torch.bfloat16),
    "int4": ("4bit", 40, 128, 32, True, torch.bfloat16, zk.ZAYA_INT4),
}


@pytest.fixture(autouse=True)
def kernels():
    if not zk.available():
        pytest.skip(f"compiled kernels unavailable: {zk.unavailable_reason()}")


def _close(got, want, rel):
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().max() <= rel * want.float().abs().max() + 1e-6


@pytest.mark.parametrize("rows", [1, 5, EXACT_ROWS, EXACT_ROWS + 1, 40])
@pytest.mark.parametrize("act_int8", [False, True])
@pytest.mark.parametrize("name", list(FORMATS))
def test_matmul_at_every_row_count(name, act_int8, rows):
    """Decode-sized and prefill-sized inputs give x @ w.T: the kernels for bf16, 4-bit and int8
    activations at any count, for exact int8 weights up to EXACT_ROWS, then a GEMM on a copy
    dequantized to bf16 (so within bf16 rounding of the weight)."""
    if act_int8 and name == "bf16":
        pytest.skip("int8 activations apply to quantized weights")
    kw, w = make(*FORMATS[name], seed=rows)
    x = torch.randn(rows, kw.k, generator=torch.Generator().manual_seed(1)).bfloat16()
    m = zk.Matmul(kw, act_int8=act_int8)
    got = m(x)
    assert got.dtype == torch.bfloat16
    want = reference.matmul(x.float(), kw, act_int8=act_int8)
    dequantized = name == "int8" and not act_int8 and rows > EXACT_ROWS
    _close(got, want, 1e-2 if dequantized else 5e-3)


@pytest.mark.parametrize("rows", [1, 6, 30])
@pytest.mark.parametrize("name", list(FORMATS))
def test_matmul_experts_and_bias(name, rows):
    """Stacked experts chosen per row (negative: a zero row) and a bias added to the fp32 sums."""
    kw, _ = make(*FORMATS[name], experts=3, seed=2)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, kw.k, generator=g).bfloat16()
    expert = torch.randint(-1, 3, (rows,), generator=g)
    got = zk.Matmul(kw, act_int8=False)(x, expert)
    want = reference.matmul(x.float(), kw, expert=expert)
    _close(got, want, 1e-2)
    assert (got[expert < 0] == 0).all()
    one, _ = make(*FORMATS[name], seed=3)
    bias = torch.randn(one.n, generator=g).bfloat16()
    got = zk.Matmul(one, bias, act_int8=False)(x, out_dtype=torch.float32)
    _close(got, reference.matmul(x.float(), one) + bias.float(), 1e-2)


def test_act_int8_follows_the_environment(monkeypatch):
    kw, _ = make(*FORMATS["int8"])
    bf, _ = make(*FORMATS["bf16"])
    monkeypatch.delenv("ZAYA_ACT_INT8", raising=False)
    assert not zk.Matmul(kw).act_int8 and not zk.Matmul(bf).act_int8  # exact unless asked
    monkeypatch.setenv("ZAYA_ACT_INT8", "1")
    assert zk.Matmul(kw).act_int8 and not zk.Matmul(bf).act_int8
    with pytest.raises(ValueError, match="int8 activations"):
        zk.Matmul(bf, act_int8=True)


@pytest.mark.parametrize("name", list(FORMATS))
def test_packing_in_blocks_and_by_expert_equals_whole(name):
    """pack_in_blocks / stack_experts assemble exactly what packing the whole tensor gives."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 70, 64, generator=g) * 0.05

    def pack(t, experts=False):
        if name == "bf16":
            return zk.pack_bf16(t.bfloat16(), experts=experts)
        from zaya.quant import QuantSpec, quantize_tensor

        parts = quantize_tensor(t, QuantSpec(8 if name == "int8" else 4, 32), torch.bfloat16)
        return (convert.from_zaya_int8(*parts, experts=experts) if name == "int8"
                else convert.from_zaya_int4(*parts, experts=experts))

    whole = pack(w[0])
    blocks = zk.pack_in_blocks(lambda r: pack(w[0][r]), 70, rows=32)
    assert torch.equal(blocks.dequantize(), whole.dequantize()) and blocks.n == 70
    stacked = zk.stack_experts(lambda e: pack(w[e]), 3)
    assert stacked.experts == 3 and torch.equal(stacked.dequantize(), pack(w, experts=True).dequantize())
    with pytest.raises(ValueError, match="multiple of 16"):
        zk.pack_in_blocks(lambda r: pack(w[0][r]), 70, rows=20)


def test_swiglu_experts_match_the_model_experts():
    """The kernels' top-1 experts compute ZayaExperts.forward, skip class included."""
    from zaya.config import ZayaConfig
    from tests.tiny_model import tiny_config

    cfg = ZayaConfig.from_dict(tiny_config())
    experts = ZayaExperts(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_((torch.randn(experts.gate_up_proj.shape, generator=g) * 0.2).bfloat16().float())
        experts.down_proj.copy_((torch.randn(experts.down_proj.shape, generator=g) * 0.2).bfloat16().float())
    x = torch.randn(9, cfg.hidden_size, generator=g)
    index = torch.tensor([0, 4, 1, 1, 3, 4, 2, 0, 3])  # 4 = the skip class
    weight = torch.rand(9, generator=g)
    stacks = [zk.Matmul(zk.pack_bf16(p.detach().bfloat16(), experts=True))
              for p in (experts.gate_up_proj, experts.down_proj)]
    with torch.no_grad():
        want = experts(x, index, weight)
    got = zk.swiglu_experts(*stacks, x, index, weight, cfg.num_experts)
    _close(got, want, 1e-5)
    assert (got[index == 4] == 0).all()



@pytest.mark.parametrize("args", [FORMATS["bf16"], FORMATS["int4"], FORMATS["int8"],
                                  ("int8", 40, 96, 32, False, torch.bfloat16),
                                  ("int8", 40, 80, 16, False, torch.bfloat16, None, 3),  # padded K, experts
                                  ("int8", 40, 96, 32, False, torch.float32)])
def test_dequantize_bf16_equals_rounding_the_fp32_weight(args):
    """The direct int8 -> bf16 route gives the bits of dequantize().to(bf16), groups and all."""
    from zaya.kernels.layouts import dequantize_bf16

    kw, _ = make(*args, seed=5)
    assert torch.equal(dequantize_bf16(kw), kw.dequantize().to(torch.bfloat16))
