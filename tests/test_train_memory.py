"""The per-rank memory estimate (``zaya train --dry-run``): state counted from the model, activations
extrapolated from small measured models, ZAYA1-8B against the targets."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.tiny_model import tiny_config
from tests.tiny_train import config_dict

from zaya.lora import LoraSpec, apply_lora
from zaya.config import ZayaConfig
from zaya.model import ZayaForCausalLM
from zaya.train import from_dict, memory
from zaya.train.config import load_config
from zaya.train.loss import LossModel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ZayaConfig.from_dict(tiny_config())


def cfg_for(tmp_path, **sections):
    raw = config_dict(tmp_path, **sections)
    if sections.get("lora"):
        raw["model"] = {"init_from": str(tmp_path)}
    return from_dict(raw)


def counts(spec=None):
    with torch.device("meta"):
        model = ZayaForCausalLM(CONFIG)
    if spec:
        apply_lora(model, spec)
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def estimate(cfg, world):
    return memory.estimate(cfg, CONFIG, world, activations=False)


def test_state_bytes_follow_strategy_precision_and_lora(tmp_path):
    n, _ = counts()
    rows = estimate(cfg_for(tmp_path), 1).rows
    assert (rows["parameters"], rows["gradients"], rows["optimizer"], rows["working set"]) == (4 * n, 4 * n, 8 * n, 0)
    assert estimate(cfg_for(tmp_path), 2).rows["gradients"] == 8 * n  # DDP's buckets
    fsdp = estimate(cfg_for(tmp_path, distributed={"strategy": "fsdp"}), 4)
    assert fsdp.rows["parameters"] == -(-4 * n // 4) and fsdp.state == -(-4 * n // 4) * 2 + -(-8 * n // 4)
    assert fsdp.rows["working set"] > 0
    bf16 = estimate(cfg_for(tmp_path, train={"precision": "bf16"}), 1)
    assert bf16.rows["parameters"] == 4 * n and bf16.rows["working set"] > 0  # autocast's bf16 weight copies

    spec = LoraSpec(4, targets=("attention", "experts"))
    total, trained = counts(spec)
    lora = estimate(cfg_for(tmp_path, train={"precision": "bf16"}, lora={"r": 4, "targets": ["attention", "experts"]}),
                    1)
    assert (lora.params, lora.trained) == (total, trained)
    assert lora.rows["parameters"] == 2 * (total - trained) + 4 * trained  # frozen bf16 base, fp32 adapters
    assert (lora.rows["gradients"], lora.rows["optimizer"]) == (4 * trained, 8 * trained)


def test_activations_extrapolate_to_a_measured_model(tmp_path):
    """The estimate, built from 1- and 2-block models with a short vocabulary, against the saved
    tensors of the whole model at the run's depth, vocabulary and token count."""
    config = dataclasses.replace(CONFIG, num_hidden_layers=4, layer_types=["hybrid"] * 4, vocab_size=1024)
    cfg = cfg_for(tmp_path, data={"seq_len": 40}, train={"micro_batch": 3, "global_batch": 6})
    estimate = memory.activation_bytes(cfg, config)
    model, _ = memory._proxy_model(config, "fp32", "ddp", None)
    tokens = 3 * 40
    measured = memory._saved_bytes(model, False, tokens)
    # the loss of these 120 tokens fits one chunk: the estimate adds the logits and their gradient
    expected = measured + tokens * config.vocab_size * (2 * 4 + 4)
    print(f"activations: estimate {estimate} bytes, measured {expected}")
    assert abs(estimate - expected) < 0.1 * expected
    checkpointed = memory.activation_bytes(cfg_for(tmp_path, data={"seq_len": 40}, train={
        "micro_batch": 3, "global_batch": 6, "activation_checkpointing": True}), config)
    assert checkpointed < 0.7 * estimate


def test_chunked_loss_equals_the_whole_loss(monkeypatch):
    torch.manual_seed(0)
    model = ZayaForCausalLM(CONFIG)
    model.init_weights(0)
    x = torch.randint(0, CONFIG.vocab_size, (2, 9))
    y = torch.randint(0, CONFIG.vocab_size, (2, 9))
    mask = (torch.rand(2, 9) > 0.3).float()
    whole, counts_whole = LossModel(model)(x, y, mask)
    whole.backward()
    grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    monkeypatch.setattr("zaya.train.loss.CHUNK_ELEMENTS", 4 * CONFIG.vocab_size)  # chunks of 4 tokens
    chunked, counts_chunked = LossModel(model)(x, y, mask)
    chunked.backward()
    assert torch.allclose(whole, chunked, rtol=1e-6) and torch.equal(counts_whole, counts_chunked)
    assert torch.allclose(grad, model.model.embed_tokens.weight.grad, atol=1e-6)


def test_dry_run_for_zaya1_8b_meets_the_targets(capsys):
    from zaya.train.cli import add_arguments, run

    fsdp = load_config(ROOT / "recipes" / "finetune-zaya1-8b-fsdp.toml")
    config = ZayaConfig.from_dict(__import__("json").loads((ROOT / "recipes/zaya1-8b/config.json").read_text()))
    est = memory.estimate(fsdp, config, 8, activations=False)
    assert round(est.params / 1e9, 2) == 8.84
    assert est.state <= 20e9  # parameters + gradients + AdamW per rank on 8 ranks

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    lora = str(ROOT / "recipes" / "finetune-zaya1-8b-lora.toml")
    assert run(parser.parse_args([lora, "--dry-run", "--device-memory", "24"])) == 0
    out = capsys.readouterr().out
    state = float(next(line for line in out.splitlines() if "parameters + grads + optimizer" in line).split()[-1])
    print(out)
    assert state <= 24  # the frozen bf16 base, rank-16 adapters and their AdamW state, one rank
    assert "fits" in out and "does NOT fit" not in out
    assert run(parser.parse_args([lora, "--dry-run", "--device-memory", "16"])) == 1
    assert "does NOT fit" in capsys.readouterr().out
    with pytest.raises(Exception, match="--ranks N"):
        run(parser.parse_args([str(ROOT / "recipes" / "finetune-zaya1-8b-fsdp.toml"), "--dry-run", "--ranks", "1"]))
