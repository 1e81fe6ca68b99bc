"""Loader: both layouts, conversion, and clear errors for every kind of broken checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import zaya
from tests.legacy_layout import write_legacy
from tests.tiny_model import make_tiny_model_dir
from zaya.checkpoint import convert
from zaya.errors import CheckpointError, ConfigError

SLIDING = dict(num_hidden_layers=4, layer_types=["hybrid", "hybrid_sliding", "hybrid", "hybrid_sliding"],
               sliding_window=6)


@pytest.mark.parametrize("overrides", [{}, SLIDING])
def test_legacy_layout_loads_to_identical_logits_and_converts(tmp_path, overrides):
    native = make_tiny_model_dir(tmp_path / "native", tokenizer=False, **overrides)
    legacy = write_legacy(native, tmp_path / "legacy")
    layers = 2 * (overrides.get("num_hidden_layers", 3))
    assert any(".zaya_block.experts.local_experts.0.linear_fc1.weight" in k for k in legacy)
    assert f"model.layers.{layers - 1}.res_scale.residual_scale" in legacy
    assert "model.layers.0.res_scale.residual_scale" not in legacy  # layer 0 has no residual half
    a, b = zaya.load(native), zaya.load(tmp_path / "legacy")
    assert b.layout == "legacy" and a.layout == "native"
    x = torch.randint(3, 512, (1, 10))
    assert torch.equal(a.logits(x), b.logits(x))

    assert convert(tmp_path / "legacy", tmp_path / "converted") == "legacy"
    c = zaya.load(tmp_path / "converted")
    assert c.layout == "native" and torch.equal(a.logits(x), c.logits(x))
    ref = load_file(str(native / "model.safetensors"))
    got = load_file(str(tmp_path / "converted" / "model.safetensors"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_cli_convert_round_trip(tmp_path):
    from zaya.cli import main

    native = make_tiny_model_dir(tmp_path / "native", tokenizer=False)
    write_legacy(native, tmp_path / "legacy")
    assert main(["convert", str(tmp_path / "legacy"), str(tmp_path / "out")]) == 0
    x = torch.randint(3, 512, (1, 6))
    assert torch.equal(zaya.load(native).logits(x), zaya.load(tmp_path / "out").logits(x))


@pytest.fixture
def ckpt(tmp_path):
    return make_tiny_model_dir(tmp_path / "m", tokenizer=False)


def rewrite(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    rewrite(ckpt, lambda s: s.pop("model.layers.1.self_attn.qk_norm.temp"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.qk_norm\.temp is missing"):
        zaya.load(ckpt)


def test_unexpected_tensor_is_named_with_its_file(ckpt):
    rewrite(ckpt, lambda s: s.__setitem__("model.layers.0.self_attn.qkv.temp", torch.ones(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.0\.self_attn\.qkv\.temp in "
                                              r"model\.safetensors"):
        zaya.load(ckpt)


def test_wrong_shape_is_named(ckpt):
    rewrite(ckpt, lambda s: s.__setitem__("model.layers.2.mlp.experts.down_proj", torch.zeros(4, 64, 31)))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.down_proj in model\.safetensors "
                                              r"has shape \[4, 64, 31\], expected \[4, 64, 32\]"):
        zaya.load(ckpt)


def test_truncated_file(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(truncated or corrupt)"):
        zaya.load(ckpt)


def test_garbage_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        zaya.load(ckpt)


@pytest.mark.parametrize("change, message", [
    ("{not json", "not valid JSON"),
    ({"num_experts_per_tok": 2}, "num_experts_per_tok must be 1"),
    ({"layer_types": ["hybrid", "hybrid_sliding", "hybrid"]}, "sliding_window is not set"),
    ({"hidden_size": "64"}, "hidden_size must be an integer"),
    ({"num_attention_heads": 3}, "multiple of num_key_value_heads"),
    ({"layer_types": ["hybrid"]}, "layer_types has 1 entries"),
    ({"model_type": "llama"}, "expected 'zaya'"),
])
def test_bad_config(ckpt, change, message):
    f = ckpt / "config.json"
    if isinstance(change, str):
        f.write_text(change)
    else:
        raw = json.loads(f.read_text())
        raw.update(change)
        f.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message):
        zaya.load(ckpt)


def test_missing_config_and_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "zaya"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle checkpoints are never loaded"):
        zaya.load(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        zaya.load(tmp_path / "..")


def test_config_mismatch_with_tensors(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["num_experts"] = 8
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="expected"):
        zaya.load(ckpt)


def test_missing_shard(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", tokenizer=False, max_shard_bytes=40_000)
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        zaya.load(path)


def test_offline_hub_id_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="cannot download Zyphra/ZAYA1-8B"):
        zaya.load("Zyphra/ZAYA1-8B")


def test_unknown_keys_are_ignored(ckpt):
    raw = json.loads((ckpt / "config.json").read_text())
    raw["some_future_key"] = {"x": 1}
    (ckpt / "config.json").write_text(json.dumps(raw))
    assert zaya.load(ckpt).config.extra["some_future_key"] == {"x": 1}
