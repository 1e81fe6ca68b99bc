"""`zaya bench` on a tiny model: it runs, reports every figure and ends with one JSON line."""

from __future__ import annotations

import json

import pytest

from tests.tiny_model import make_tiny_model_dir
from zaya.cli import main


def test_bench_smoke(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.delenv("ZAYA_COMPILE", raising=False)
    assert main(["bench", "-m", str(tiny_model_dir), "--prefill-tokens", "16", "--new-tokens", "4", "--rounds", "1",
                 "--batches", "1,2"]) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed.strip().splitlines()[-1])
    # which decode step ran, and why: auto picks eager on CPU
    assert printed.startswith("decode step: eager (compile auto, the default: on CPU the compiled step measured")
    assert (out["compile"], out["compiled"], out["compile_failure"]) == ("auto", False, None)
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b2_tok_s", "weight_bytes_per_token", "achieved_gb_s",
                "bandwidth_gb_s", "mbu", "peak_rss_bytes", "cache_bytes_per_token", "cache_blocks",
                "cache_memory_bytes"):
        assert out[key] > 0, key
    # the derived figures follow from the measured ones: GB/s = tok/s x bytes per token, MBU = GB/s / bandwidth
    assert out["achieved_gb_s"] == pytest.approx(out["decode_b1_tok_s"] * out["weight_bytes_per_token"] / 1e9)
    assert out["mbu"] == pytest.approx(out["achieved_gb_s"] / out["bandwidth_gb_s"])
    assert out["cache_capacity_tokens"] == out["cache_blocks"] * out["cache_block_size"]
    assert main(["bench", "-m", str(tiny_model_dir), "--prefill-tokens", "16", "--new-tokens", "4", "--rounds", "1",
                 "--batches", "1", "--cache-memory", "4MiB", "--compile", "off"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("decode step: eager (compile off)\n")
    assert json.loads(printed.strip().splitlines()[-1])["cache_memory_bytes"] == 4 << 20
    assert "kv cache" in printed and "bytes per token" in printed and "4.0 MiB" in printed


def test_bench_quality_smoke(tmp_path, capsys):
    path = make_tiny_model_dir(tmp_path / "m", hidden_size=64, moe_intermediate_size=64)
    assert main(["bench", "-m", str(path), "--quality", "--quality-modes", "int8,int4:32",
                 "--greedy-tokens", "8"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["quantize"] for r in out["quality"]] == ["int8", "int4:32"]
    for r in out["quality"]:
        assert 0 <= r["greedy_agreement"] <= 1 and 0 <= r["top1_agreement"] <= 1 and r["mean_kl"] >= 0


def test_weight_bytes_count_one_expert(tiny_model_dir):
    import zaya
    from zaya.bench import weight_bytes_per_token

    m = zaya.load(tiny_model_dir).model
    total = sum(t.numel() * t.element_size() for t in m.state_dict().values()) - \
        m.lm_head.weight.numel() * 4  # tied: counted once
    experts = sum(p.numel() * 4 for n, p in m.named_parameters() if ".mlp.experts." in n)
    assert weight_bytes_per_token(m) == total - experts + experts // m.config.num_experts
