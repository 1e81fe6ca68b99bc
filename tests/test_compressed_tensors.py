"""compressed-tensors checkpoints (FP8 and MXFP4 experts, as Zyphra publishes them) written with the
package: zaya's logits against the float model built from the package's own decompression, the
experts kept compressed and bit-exact, and the configs and files zaya refuses."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import zaya
from tests.tiny_model import greedy_reference, make_tiny_model
from zaya.errors import CheckpointError
from zaya.formats import KernelExperts

pytest.importorskip("compressed_tensors")
from tests.ct_files import rewrite, write_ct_checkpoint  # noqa: E402

SHAPE = dict(hidden_size=64, moe_intermediate_size=64, num_hidden_layers=2)  # MXFP4 groups of 32 divide both
IDS = torch.tensor([[2, 40, 41, 42, 100, 7, 300, 5, 17, 250, 3, 99]])
KINDS = ["fp8-channel", "fp8-tensor", "fp8-block", "mxfp4"]


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(0, **SHAPE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model, tokenizer_dir):
    root = tmp_path_factory.mktemp("ct")
    return {kind: (root / kind, write_ct_checkpoint(model, root / kind, kind, tokenizer_dir=tokenizer_dir))
            for kind in KINDS}


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_the_decompressed_float_model(checkpoints, kind):
    path, ref = checkpoints[kind]
    llm = zaya.load(path, dtype="fp32")
    experts = llm.model.model.layers[1].mlp.experts
    assert isinstance(experts, KernelExperts)
    assert llm.config.quantization["method"] == "compressed-tensors"
    with torch.no_grad():
        want = ref(IDS)
    assert (llm.logits(IDS) - want).abs().max().item() < 1e-4
    # the kept weights are the package's decompression, bit for bit
    for e in range(experts.num_experts):
        assert torch.equal(experts.gate_up_proj.kernels[e].dequantize(), ref.model.layers[1].mlp.experts.gate_up_proj[e])
        assert torch.equal(experts.down_proj.kernels[e].dequantize(), ref.model.layers[1].mlp.experts.down_proj[e])
    tokens = llm.generate([IDS[0, :4].tolist()], max_new_tokens=5, temperature=0, ignore_eos=True)[0].token_ids
    assert tokens == greedy_reference(ref, IDS[0, :4].tolist(), 5)


def test_bf16_load_keeps_the_experts_compressed_and_the_rest_packed(checkpoints):
    llm = zaya.load(checkpoints["mxfp4"][0], dtype="bf16")
    assert type(llm.model.model.layers[0].self_attn.o_proj).__name__ == "PackedLinear"
    assert isinstance(llm.model.model.layers[0].mlp.experts, KernelExperts)
    assert torch.isfinite(llm.logits(IDS)).all()
    assert llm.tokenizer is not None


def test_quantizing_again_is_refused(checkpoints):
    with pytest.raises(CheckpointError, match="already quantized"):
        zaya.load(checkpoints["fp8-channel"][0], quantize="int4")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _one_line(exc, *needles):
    text = str(exc.value)
    assert "\n" not in text, text
    for n in needles:
        assert n in text, text


def test_an_unsupported_format_in_the_config(tmp_path, checkpoints):
    path = _copy(checkpoints["fp8-channel"][0], tmp_path / "c")
    rewrite(path, format="pack-quantized", config_groups={"group_0": {"targets": ["Linear"], "format": None,
                                                                      "weights": {"num_bits": 4, "type": "int"}}})
    with pytest.raises(CheckpointError) as exc:
        zaya.load(path)
    _one_line(exc, "config.json", "group_0", "pack-quantized")


def test_a_quantized_tensor_the_config_ignores(tmp_path, checkpoints):
    path = _copy(checkpoints["fp8-channel"][0], tmp_path / "c")
    rewrite(path, ignore=["re:.*layers\\.1\\.mlp\\.experts.*"])
    with pytest.raises(CheckpointError) as exc:
        zaya.load(path)
    _one_line(exc, "model.layers.1.mlp.experts.", "model.safetensors", "ignore")


def test_zero_points_are_refused_by_name(tmp_path, checkpoints):
    path = _copy(checkpoints["fp8-channel"][0], tmp_path / "c")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.mlp.experts.down_proj.weight_zero_point"] = torch.zeros(4, 64, 1)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        zaya.load(path)
    _one_line(exc, "model.layers.0.mlp.experts.down_proj.weight_zero_point", "model.safetensors")


def test_missing_scale_and_wrong_dtype(tmp_path, checkpoints):
    path = _copy(checkpoints["mxfp4"][0], tmp_path / "c")
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.mlp.experts.gate_up_proj.weight_scale"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        zaya.load(path)
    _one_line(exc, "model.layers.1.mlp.experts.gate_up_proj.weight_packed")
    path = _copy(checkpoints["fp8-channel"][0], tmp_path / "d")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.mlp.experts.gate_up_proj"] = state["model.layers.0.mlp.experts.gate_up_proj"].float()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError) as exc:
        zaya.load(path)
    _one_line(exc, "model.layers.0.mlp.experts.gate_up_proj", "float8_e4m3fn")
