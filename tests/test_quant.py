"""Weight-only quantization: modules against their float originals, and quantized checkpoints on disk."""

from __future__ import annotations

import json

import pytest
import torch

import zaya
import zaya.kernels
from tests.tiny_model import make_tiny_model_dir
from zaya.checkpoint import save_quantized
from zaya.errors import CheckpointError, ConfigError
from zaya.quant import QuantLinear, QuantSpec, dequantize, quantize_tensor

QUANT = dict(hidden_size=64, moe_intermediate_size=64)  # int4 groups of 32 divide every width
# PyTorch's packed CPU kernels, where this build has them: without zaya's kernels decode must run on them
KERNELS = {8: hasattr(torch.ops.aten, "_weight_int8pack_mm"),
           4: hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
           and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")}


@pytest.fixture(params=["zaya", "torch"])
def kernel_set(request, monkeypatch):
    """Both kernel sets quantized weights can run on: zaya's (when its library builds) and
    PyTorch's packed ones (what is used when it does not)."""
    if request.param == "zaya":
        if not zaya.kernels.available():
            pytest.skip(f"zaya kernels unavailable: {zaya.kernels.unavailable_reason()}")
    else:
        monkeypatch.setattr(zaya.kernels, "available", lambda: False)
    return request.param


def _linear(w, spec, dtype):
    q = QuantLinear(w.shape[1], w.shape[0], spec)
    parts = quantize_tensor(w, spec, dtype)
    q.qweight, q.scales = parts[0], parts[1]
    if spec.bits == 4:
        q.zeros = parts[2]
    q.prepare(dtype)
    return q, parts


@pytest.mark.parametrize("bits,group,tol", [(8, 0, 0.01), (4, 32, 0.15), (4, 64, 0.15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_matches_float(bits, group, tol, dtype, kernel_set):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 128, generator=g), torch.randn(5, 128, generator=g)
    spec = QuantSpec(bits, group or 64)
    q, parts = _linear(w, spec, dtype)
    if kernel_set == "zaya":
        assert isinstance(q.w.kernel, zaya.kernels.Matmul)
    else:
        assert q.w.kernel is None and q.w.fast == KERNELS[bits]  # 5 rows: the packed kernel's path
    ref = x @ w.t()
    y = q(x.to(dtype)).float()
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < tol, rel
    # the kernel path equals the dequantized weight's matmul (same quantized numbers)
    deq = x.to(dtype).float() @ dequantize(*parts, dtype=torch.float32).t()
    assert (y - deq).abs().max().item() <= 0.02 * deq.abs().max().item() + 1e-3


def test_quant_portable_fallback_equals_kernel(monkeypatch):
    monkeypatch.setattr(zaya.kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(64, 64, generator=g), torch.randn(3, 64, generator=g)
    for spec in (QuantSpec(8), QuantSpec(4, 32)):
        q, _ = _linear(w, spec, torch.float32)
        if not KERNELS[spec.bits]:
            continue  # nothing to compare the fallback with
        assert q.w.fast
        fast = q(x)
        q.w.fast = False
        assert (q(x) - fast).abs().max().item() < 1e-3


def test_spec_parsing():
    assert QuantSpec.parse("int4:128") == QuantSpec(4, 128)
    assert QuantSpec.parse({"bits": 8}) == QuantSpec(8)
    with pytest.raises(ConfigError):
        QuantSpec.parse("int3")


@pytest.mark.parametrize("quantize", ["int8", "int4:32"])
def test_quantized_model_tracks_float(tmp_path, quantize, kernel_set):
    path = make_tiny_model_dir(tmp_path / "m", **QUANT)
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = zaya.load(path).logits(ids)
    llm = zaya.load(path, quantize=quantize)
    assert type(llm.model.model.embed_tokens).__name__ == "QuantEmbedding"
    assert type(llm.model.model.layers[0].mlp.gate.down_proj) is torch.nn.Linear  # the router stays float
    out = llm.logits(ids)
    assert torch.isfinite(out).all()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < (0.2 if quantize == "int8" else 0.5), rel
    # cached decode of the quantized model equals its own full forward
    full = llm.generate([ids[0].tolist()], max_new_tokens=6, temperature=0, ignore_eos=True)[0].token_ids
    seq = ids[0].tolist()
    for _ in range(6):
        seq.append(int(llm.logits([seq])[0, -1].argmax()))
    assert full == seq[12:]


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_checkpoint_round_trip(tmp_path, bits):
    from zaya.cli import main

    src = make_tiny_model_dir(tmp_path / "m", **QUANT)
    dst = tmp_path / f"q{bits}"
    assert main(["quantize", str(src), str(dst), "--bits", str(bits), "--group-size", "32"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"]["bits"] == bits
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    direct = zaya.load(src, quantize=f"int{bits}:32").logits(ids)
    loaded = zaya.load(dst)
    assert loaded.config.quantization["bits"] == bits
    assert (loaded.logits(ids) - direct).abs().max().item() == 0
    with pytest.raises(CheckpointError, match="already quantized"):
        zaya.load(dst, quantize="int4" if bits == 8 else "int8")


def test_quantized_checkpoint_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    src = make_tiny_model_dir(tmp_path / "m", **QUANT)
    dst = tmp_path / "q"
    save_quantized(src, dst, QuantSpec(8))
    state = load_file(dst / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.scales"
    save_file({k: v for k, v in state.items() if k != name}, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        zaya.load(dst)
    state["model.layers.0.self_attn.o_proj.qweight"] = state["model.layers.0.self_attn.o_proj.qweight"].float()
    save_file(state, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match="dtype"):
        zaya.load(dst)


@pytest.mark.parametrize("rows", [1, 5, 40, 130])
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_matmul_paths_agree(rows, bits, monkeypatch):
    monkeypatch.setattr(zaya.kernels, "available", lambda: False)
    """Few rows go through the packed kernel (where this torch build has it), many through a copy
    dequantized for the call (DEQUANT_ROWS): every path computes x @ dequantize(w)^T, and that is
    as close to the float x @ w^T as the quantization allows."""
    from zaya.quant import DEQUANT_ROWS, QuantWeight

    torch.manual_seed(rows)
    w = torch.randn(48, 64) * 0.05
    parts = quantize_tensor(w, QuantSpec(bits, 32), torch.bfloat16)
    x = torch.randn(rows, 64).bfloat16()
    weight = QuantWeight(*parts, *([None] if bits == 8 else []), torch.bfloat16)
    assert weight.fast == KERNELS[bits]
    on_kernel, calls = weight.fast and rows < DEQUANT_ROWS[bits], []
    if on_kernel:  # decode-sized: the packed kernel itself must run, not a dequantized copy
        name = "_weight_int8pack_mm" if bits == 8 else "_weight_int4pack_mm_for_cpu"
        kernel = getattr(torch.ops.aten, name)
        monkeypatch.setattr(torch.ops.aten, name, lambda *a: calls.append(name) or kernel(*a))
    got = weight.matmul(x).float()
    assert len(calls) == on_kernel
    want = x.float() @ dequantize(*parts, *([None] if bits == 8 else []), torch.float32).T
    assert got.shape == (rows, 48)
    assert torch.allclose(got, want, atol=0.02, rtol=0.02)
    # and against the float weight, within what the quantization itself costs
    assert ((got - x.float() @ w.T).norm() / (x.float() @ w.T).norm()).item() < (0.02 if bits == 8 else 0.15)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_at_load_in_row_blocks_matches_whole_tensors(tmp_path, monkeypatch, bits):
    """Large tensors are quantized in row blocks read with pread; the last block is shorter
    (vocab 512 rows in blocks of 3 here, as ZAYA1-8B's 262,272-row table is in 8,192-row blocks)."""
    import zaya.checkpoint.files as files

    src = make_tiny_model_dir(tmp_path / "m", **QUANT)
    ids = torch.randint(3, 512, (1, 10), generator=torch.Generator().manual_seed(3))
    whole = zaya.load(src, quantize=f"int{bits}:32").logits(ids)
    monkeypatch.setattr(files, "PREAD_BLOCK_ELEMENTS", 3 * QUANT["hidden_size"])
    blocks = zaya.load(src, quantize=f"int{bits}:32").logits(ids)
    assert torch.equal(whole, blocks)
