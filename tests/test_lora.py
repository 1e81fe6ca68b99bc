"""LoRA adapters: targets, PEFT's format both ways (peft on transformers' ZayaForCausalLM as the
oracle), merging in memory and on disk, and adapters for another base."""

from __future__ import annotations

import json

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir

import zaya
from zaya.errors import CheckpointError, ConfigError
from zaya.checkpoint import load_adapter, merge_adapter, save_adapter
from zaya.lora import LoraExperts, LoraLinear, LoraSpec, adapter_names, apply_lora, init_adapters, merge_lora

IDS = torch.tensor([[5, 17, 300, 41, 9, 77, 200, 3, 12, 64, 128, 7], [2, 8, 99, 100, 101, 23, 45, 67, 89, 90, 91, 92]])


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("lora") / "base", seed=3)


def adapted(base, spec, seed=0):
    """The base in fp32 with random (non-zero) adapters."""
    model = zaya.load(base, dtype="fp32").model
    apply_lora(model, spec)
    init_adapters(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name in adapter_names(model):
            if name.endswith("B"):
                p = model.get_parameter(name)
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).float()


def test_targets_aliases_and_errors(base):
    model = zaya.load(base, dtype="fp32").model
    names = apply_lora(model, LoraSpec(4, targets=("attention", "experts", "gate.down_proj")))
    assert "model.layers.0.self_attn.qkv_proj.q_proj" in names and "model.layers.2.mlp.gate.down_proj" in names
    assert "model.layers.1.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.experts.down_proj" in names
    assert isinstance(model.model.layers[0].self_attn.o_proj, LoraLinear)
    assert isinstance(model.model.layers[0].mlp.experts, LoraExperts)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(adapter_names(model)) and trained
    assert model.model.layers[0].mlp.experts.gate_up_lora_A.shape == (4, 4, 64)  # (E, r, H): one pair per expert

    fresh = zaya.load(base, dtype="fp32").model
    with pytest.raises(ConfigError, match="'qproj' matches no linear layer.*q_proj"):
        apply_lora(fresh, LoraSpec(4, targets=("qproj",)))
    with pytest.raises(ConfigError, match="'down_proj' names both linear layers.*expert stacks"):
        apply_lora(fresh, LoraSpec(4, targets=("down_proj",)))
    with pytest.raises(ConfigError, match="dropout must be 0 when expert stacks"):
        apply_lora(fresh, LoraSpec(4, dropout=0.1, targets=("experts",)))
    assert not any(isinstance(m, LoraLinear) for m in fresh.modules())  # a refused spec changes nothing
    with pytest.raises(ConfigError, match="lora.r must be >= 1"):
        LoraSpec(0)


def test_fresh_adapters_leave_the_model_unchanged(base):
    ref = logits(zaya.load(base, dtype="fp32").model)
    model = zaya.load(base, dtype="fp32").model
    apply_lora(model, LoraSpec(8, targets=("attention", "experts")))
    init_adapters(model, 0)  # B = 0
    assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("targets", [("attention",), ("q_proj", "experts"), ("o_proj", "mlp.experts.down_proj")])
def test_peft_loads_our_adapter_onto_transformers(base, tmp_path, targets):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    spec = LoraSpec(4, alpha=8, targets=targets)
    model = adapted(base, spec)
    ours = logits(model)
    assert (ours - logits(zaya.load(base, dtype="fp32").model)).abs().max() > 1e-3  # the adapter does something
    save_adapter(tmp_path / "adapter", {n: model.get_parameter(n) for n in adapter_names(model)}, spec, model,
                 base=str(base))
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["r"] == 4
    hf = transformers.ZayaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = ref(IDS).logits
    assert (theirs - ours).abs().max().item() < 1e-4


def test_we_load_an_adapter_peft_wrote(base, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    hf = transformers.ZayaForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj_delayed", "o_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ref = peft.get_peft_model(hf, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    ref.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        theirs = ref.eval()(IDS).logits
    model = zaya.load(base, dtype="fp32").model
    load_adapter(model, tmp_path / "peft-adapter")
    assert (logits(model) - theirs).abs().max().item() < 1e-4


def test_merge_in_memory_and_on_disk(base, tmp_path):
    spec = LoraSpec(4, alpha=8, targets=("attention", "experts"))
    model = adapted(base, spec)
    unmerged = logits(model)
    save_adapter(tmp_path / "adapter", {n: model.get_parameter(n) for n in adapter_names(model)}, spec, model)
    merge_lora(model)
    assert not any(isinstance(m, (LoraLinear, LoraExperts)) for m in model.modules())
    assert (logits(model) - unmerged).abs().max().item() < 1e-4

    out = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in base.iterdir())
    merged = zaya.load(out, dtype="fp32")
    assert merged.tokenizer is not None
    assert (logits(merged.model) - unmerged).abs().max().item() < 1e-4
    # the base's other tensors are copied exactly
    a, b = zaya.load(base, dtype="fp32").model.state_dict(), merged.model.state_dict()
    assert torch.equal(a["model.layers.0.mlp.gate.down_proj.weight"], b["model.layers.0.mlp.gate.down_proj.weight"])
    assert not torch.equal(a["model.layers.0.mlp.experts.down_proj"], b["model.layers.0.mlp.experts.down_proj"])


def test_an_adapter_for_another_base_is_refused(base, tmp_path):
    spec = LoraSpec(4, targets=("attention", "experts"))
    model = adapted(base, spec)
    save_adapter(tmp_path / "adapter", {n: model.get_parameter(n) for n in adapter_names(model)}, spec, model)
    other = make_tiny_model_dir(tmp_path / "other", seed=4, hidden_size=32, tokenizer=False)
    target = zaya.load(other, dtype="fp32").model
    with pytest.raises(CheckpointError, match="trained for another base model: it has hidden_size 64 .this base: 32"):
        load_adapter(target, tmp_path / "adapter")
    assert not any(isinstance(m, LoraLinear) for m in target.modules())  # refused before any change
    with pytest.raises(CheckpointError, match="another base model"):
        merge_adapter(other, tmp_path / "adapter", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()

    # without the recorded shape (an adapter from elsewhere) the tensor shapes still catch it
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="has shape .* but this base needs .* trained for another base"):
        load_adapter(target, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="not a LoRA adapter directory"):
        load_adapter(target, tmp_path)


@pytest.mark.parametrize("targets", [("attention", "experts"), ("k_proj",)])
def test_load_with_an_adapter_serves_it_unmerged(base, tmp_path, targets):
    """zaya.load(base, adapter=DIR) in bf16, where the other modules take the prepacked CPU
    classes: the adapted ones must not (a packed q/k/v matrix would skip a k_proj adapter)."""
    from zaya.cli import main
    from zaya.packed import PACKED, PackedCCAProjection

    spec = LoraSpec(4, alpha=8, targets=targets)
    model = adapted(base, spec)
    save_adapter(tmp_path / "adapter", {n: model.get_parameter(n) for n in adapter_names(model)}, spec, model)
    llm = zaya.load(base, dtype="bf16", adapter=tmp_path / "adapter")
    assert any(isinstance(m, PACKED) for m in llm.model.modules())  # the rest of the model is still packed
    assert not any(isinstance(m, PackedCCAProjection) for m in llm.model.modules())
    assert isinstance(llm.model.model.layers[0].self_attn.qkv_proj.k_proj, LoraLinear)
    fp32 = logits(model)
    assert (logits(llm.model) - fp32).abs().max().item() < 0.05 * fp32.abs().max().item()  # bf16 rounding
    plain = zaya.load(base, dtype="fp32", adapter=tmp_path / "adapter")
    assert (logits(plain.model) - fp32).abs().max().item() < 1e-5

    assert main(["export", str(base), str(tmp_path / "merged"), "--merge-lora", str(tmp_path / "adapter")]) == 0
    merged = zaya.load(tmp_path / "merged", dtype="fp32").model
    assert (logits(merged) - fp32).abs().max().item() < 1e-4
    with pytest.raises(CheckpointError, match="Merge it first"):
        zaya.load(base, quantize="int8", adapter=tmp_path / "adapter")
