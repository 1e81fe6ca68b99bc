"""The measuring halves of benchmarks/compare_*.py on tiny inputs: byte counts and the zaya runner.

The llama.cpp half needs the ``gguf`` package (and llama-cpp-python to time), which zaya never
installs; its tests run only where the benchmark's own environment provides them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.tiny_model import make_tiny_model_dir
from zaya.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import llamacpp_side  # noqa: E402
import zaya_side  # noqa: E402


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_checkpoint_bytes_match_the_loaded_model(tmp_path, bits):
    import zaya
    from zaya.bench import weight_bytes_per_token

    path = make_tiny_model_dir(tmp_path / "m", tokenizer=False)
    if bits:
        assert main(["quantize", str(path), str(tmp_path / "q"), "--bits", str(bits), "--group-size", "32"]) == 0
        path = tmp_path / "q"
    model = zaya.load(path).model
    assert zaya_side.checkpoint_bytes_per_token(path) == weight_bytes_per_token(model)


def test_checkpoint_bytes_need_safetensors(tmp_path):
    (tmp_path / "config.json").write_text('{"num_experts": 4}')
    with pytest.raises(FileNotFoundError, match="safetensors"):
        zaya_side.checkpoint_bytes_per_token(tmp_path)


def test_zaya_runner_times_every_workload(tmp_path):
    path = make_tiny_model_dir(tmp_path / "m", tokenizer=False)
    runner = zaya_side.ZayaRunner(path)
    assert runner.decode(2, 8, 4, seed=0) > 0
    assert runner.prefill(16, seed=0) > 0
    out = zaya_side.run(path, ["decode_b1", "decode_b8"], new_tokens=3, seed=1)
    assert set(out["tok_s"]) == {"decode_b1", "decode_b8"} and min(out["tok_s"].values()) > 0
    assert out["peak_rss"] > 0


def test_stand_in_has_the_shape_of_a_zaya_layer():
    spec = zaya_side.SHAPES["mini"]
    shapes = dict(llamacpp_side.tensor_shapes(spec))
    H, F, E = spec["hidden_size"], spec["moe_intermediate_size"], spec["num_experts"]
    assert shapes["token_embd.weight"] == (spec["vocab_size"], H) and "output.weight" not in shapes
    assert shapes["blk.0.attn_q.weight"] == (8 * 128, H) and shapes["blk.0.attn_k.weight"] == (2 * 128, H)
    assert shapes["blk.7.ffn_down_exps.weight"] == (E, H, F) and "blk.8.attn_q.weight" not in shapes


def test_stand_in_gguf_bytes_per_token(tmp_path):
    pytest.importorskip("gguf", reason="gguf is installed only in the llama.cpp benchmark's environment")
    spec = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=32, num_experts=4, moe_intermediate_size=32)
    for kind in ("F16", "BF16"):
        path = tmp_path / f"{kind}.gguf"
        llamacpp_side.write_float(spec, path, kind)
        counted = llamacpp_side.bytes_per_token(path)
        # per layer: q, k, v, o, router, one expert's gate / up / down; plus the tied head, norms in F32
        layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 4 * 64 + 3 * 32 * 64
        assert counted["bytes_per_token"] == 2 * (2 * layer + 300 * 64) + 4 * 64 * (2 * 2 + 1)
        assert counted["bytes_by_type"][kind] > 0
