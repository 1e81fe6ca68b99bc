"""CPU fast paths: prepacked bf16 weights (zaya.packed: zaya's kernels, or oneDNN with the same
numbers as F.linear; ordinary state_dict, grads still work) and the fp32 decode attention used
for long caches."""

from __future__ import annotations

import pytest
import torch

import zaya
import zaya.kernels
from tests.tiny_model import make_tiny_model_dir
from zaya import packed
from zaya.cpu_attention import DECODE_ATTENTION_MIN_KEYS, decode_attention
from zaya.packed import PackedCCAProjection, PackedExperts, PackedLinear

needs_packing = pytest.mark.skipif(not packed.available(torch.bfloat16, "cpu"),
                                   reason="neither zaya's kernels nor oneDNN's packed bf16 linear are available")
needs_kernels = pytest.mark.skipif(not zaya.kernels.available(), reason="zaya's compiled kernels are unavailable")


def _load(model_dir, monkeypatch, on: bool):
    monkeypatch.setenv("ZAYA_CPU_PACKED", "1" if on else "0")
    return zaya.load(model_dir, dtype="bf16")


@pytest.fixture
def onednn(monkeypatch):
    """Packing as it is when zaya's kernels cannot be built: oneDNN's blocked layout."""
    monkeypatch.setattr(zaya.kernels, "available", lambda: False)
    if not packed.available(torch.bfloat16, "cpu"):
        pytest.skip("oneDNN packed bf16 linear not available in this torch build")


def _compare_with_plain(fast, plain, exact: bool) -> None:
    ids = torch.randint(3, fast.model.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = fast.model(ids), plain.model(ids)  # prefill: many rows per expert
    if exact:
        assert torch.equal(a, b)
    else:  # the same products in another summation order, each output rounded to bf16 once
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()
    for seed in range(3):
        prompt = torch.randint(3, 512, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        x = fast.generate([prompt], max_new_tokens=12, temperature=0, ignore_eos=True)[0]
        y = plain.generate([prompt], max_new_tokens=12, temperature=0, ignore_eos=True)[0]
        assert x.token_ids == y.token_ids
    # the state dict holds the ordinary weights, not the packed layout
    sa, sb = fast.model.state_dict(), plain.model.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@needs_kernels
def test_kernel_packed_model_matches_plain(tiny_model_dir, monkeypatch):
    fast, plain = _load(tiny_model_dir, monkeypatch, True), _load(tiny_model_dir, monkeypatch, False)
    experts = fast.model.model.layers[0].mlp.experts
    assert isinstance(experts, PackedExperts) and all(isinstance(m, zaya.kernels.Matmul) for m in experts.stacks)
    assert isinstance(fast.model.lm_head.packed, zaya.kernels.Matmul)
    assert isinstance(fast.model.model.layers[0].self_attn.qkv_proj.packed_qkv, zaya.kernels.Matmul)  # q, k, v fused
    assert not isinstance(plain.model.lm_head, PackedLinear)
    _compare_with_plain(fast, plain, exact=False)


def test_onednn_packed_model_matches_plain_bit_for_bit(tiny_model_dir, monkeypatch, onednn):
    fast, plain = _load(tiny_model_dir, monkeypatch, True), _load(tiny_model_dir, monkeypatch, False)
    assert isinstance(fast.model.lm_head.packed, packed.OneDNNMatrix) and fast.model.model.layers[0].mlp.experts.packed
    assert fast.model.model.layers[0].self_attn.qkv_proj.packed_qkv is not None
    assert not isinstance(plain.model.model.layers[0].mlp.experts, PackedExperts)
    _compare_with_plain(fast, plain, exact=True)


@needs_packing
def test_packed_model_still_trains(tiny_model_dir, monkeypatch):
    model = _load(tiny_model_dir, monkeypatch, True).model
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    ids = torch.randint(3, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    model(ids).float().logsumexp(-1).mean().backward()  # falls back to F.linear when grads are needed
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.o_proj.weight.grad is not None
    assert model.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_packing_is_off_for_other_dtypes():
    assert not packed.available(torch.float32, "cpu")
    assert not packed.available(torch.bfloat16, "meta")


@pytest.mark.parametrize("L,masked", [(5, False), (300, False), (300, True)])
def test_decode_attention_matches_sdpa(L, masked):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, h, n, 16, generator=g) for h, n in ((6, 1), (2, L), (2, L)))
    mask = None
    if masked:
        mask = torch.rand(2, 1, 1, L, generator=g) > 0.4
        mask[..., -1] = True
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert torch.allclose(decode_attention(q, k, v, mask, 0.25), want, atol=1e-5)
    got16 = decode_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.25)
    assert got16.dtype == torch.bfloat16 and torch.allclose(got16.float(), want, atol=2e-2)


def test_long_bf16_decode_matches_full_forward(tiny_model_dir):
    """Past DECODE_ATTENTION_MIN_KEYS cached tokens, cached decode still equals a full forward."""
    llm = zaya.load(tiny_model_dir, dtype="bf16")
    n = DECODE_ATTENTION_MIN_KEYS + 20
    ids = torch.randint(3, llm.model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(2))
    out = llm.generate([ids[0].tolist()], max_new_tokens=6, temperature=0, ignore_eos=True)[0]
    full = torch.tensor([ids[0].tolist() + out.token_ids[:-1]])
    with torch.inference_mode():
        greedy = llm.model(full)[0, n - 1:].float().argmax(-1).tolist()
    assert greedy == out.token_ids


@pytest.mark.parametrize("kernel_set", ["zaya", "onednn"])
def test_large_linears_pack_in_row_blocks(tiny_model_dir, monkeypatch, kernel_set, request):
    """A matrix above PACK_BLOCK_BYTES is read and packed in row blocks, with the same numbers
    (the head here: vocab 512 in blocks of 48 rows, bias included)."""
    import zaya.packed as packed_mod

    if kernel_set == "onednn":
        request.getfixturevalue("onednn")
    elif not zaya.kernels.available():
        pytest.skip("zaya's compiled kernels are unavailable")
    whole = _load(tiny_model_dir, monkeypatch, True)
    monkeypatch.setattr(packed_mod, "PACK_BLOCK_BYTES", 48 * 2 * whole.model.config.hidden_size)
    fast = _load(tiny_model_dir, monkeypatch, True)
    if kernel_set == "onednn":
        assert len(fast.model.lm_head.packed.blocks) == -(-whole.model.config.vocab_size // 48)
    ids = torch.randint(3, whole.model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(fast.model(ids), whole.model(ids))
    lin = torch.nn.Linear(64, 100, bias=True).bfloat16()
    ref = lin(torch.ones(3, 64, dtype=torch.bfloat16))
    net = packed_mod.pack_model(torch.nn.Sequential(lin))
    assert isinstance(net[0], PackedLinear) and net[0].weight is lin.weight  # the same parameters
    got = net[0](torch.ones(3, 64, dtype=torch.bfloat16))
    assert (got.float() - ref.float()).abs().max() <= (0 if kernel_set == "onednn" else 1e-2 * ref.abs().max())


@needs_packing
@pytest.mark.parametrize("quantize", ["int8", "int4:32"])
def test_quantized_bf16_model_packs_its_float_linears(tmp_path, monkeypatch, quantize):
    """In a quantized bf16 model only the float linears (the router's) are packed, and the
    logits equal those of the same model unpacked (up to summation order on zaya's kernels)."""
    src = make_tiny_model_dir(tmp_path / "m", hidden_size=64, moe_intermediate_size=64)
    monkeypatch.setenv("ZAYA_CPU_PACKED", "1")
    fast = zaya.load(src, dtype="bf16", quantize=quantize)
    monkeypatch.setenv("ZAYA_CPU_PACKED", "0")
    plain = zaya.load(src, dtype="bf16", quantize=quantize)
    layer = fast.model.model.layers[0]
    assert isinstance(layer.mlp.gate.down_proj, PackedLinear)
    assert not isinstance(layer.self_attn.qkv_proj, PackedCCAProjection)
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(5))
    a, b = fast.logits(ids), plain.logits(ids)
    assert (a - b).abs().max() <= (1e-2 * b.abs().max() if zaya.kernels.available() else 0)
