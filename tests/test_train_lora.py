"""LoRA fine-tuning in one process, and the settings that are refused before training starts."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir
from tests.tiny_train import config_dict, losses

import zaya
from zaya.errors import CheckpointError, ConfigError
from zaya.checkpoint import load_adapter, merge_adapter
from zaya.train import dist as dist_mod
from zaya.train import from_dict, memory, train
from zaya.train.loop import Trainer

LORA = {"r": 4, "alpha": 8, "targets": ["attention", "experts"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("lora-train") / "base", seed=1)


def lora_config(tmp_path, base, **sections):
    raw = config_dict(tmp_path, lora={**LORA, **sections.pop("lora", {})}, optim={"lr": 1e-2, "warmup_steps": 0},
                      train={"steps": 8, "global_batch": 4, "micro_batch": 2, **sections.pop("train", {})}, **sections)
    raw["model"] = {"init_from": str(base)}
    return raw


def test_lora_loss_falls_and_only_the_adapters_change(tmp_path, base):
    cfg = from_dict(lora_config(tmp_path, base))
    env = dist_mod.init("cpu")
    trainer = Trainer(cfg, env, resume=False, log=lambda *a, **k: None)
    result = trainer.run()
    curve = losses(result.metrics)
    assert curve[8] < curve[1] - 0.2
    before = zaya.load(base, dtype="fp32").model.state_dict()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "lm_head.weight")  # the base is frozen
    changed = [k for k in after if k not in before and after[k].abs().sum() > 0]
    assert any(k.endswith("lora_B") for k in changed) and any(k.endswith("gate_up_lora_B") for k in changed)

    ckpt = result.checkpoint
    assert (ckpt / "adapter_config.json").is_file() and not (ckpt / "model.safetensors").exists()
    ids = torch.tensor([[5, 17, 300, 41, 9, 77, 200, 3]])
    with torch.no_grad():
        trained = trainer.model.eval()(ids)
    served = zaya.load(base, dtype="fp32").model
    load_adapter(served, ckpt)
    merged = zaya.load(merge_adapter(base, ckpt, tmp_path / "merged"), dtype="fp32").model
    with torch.no_grad():
        assert (served(ids) - trained).abs().max().item() < 1e-5
        assert (merged(ids) - trained).abs().max().item() < 1e-4

    # continue training the adapter in a new run (lora.adapter), and resume a LoRA run
    again = lora_config(tmp_path, base, lora={"adapter": str(ckpt)}, train={"steps": 2, "out_dir": str(tmp_path / "b")})
    first = train(from_dict(again), log=lambda *a: None)
    assert first.loss < curve[1] - 0.2  # starts where the adapter left off
    extended = lora_config(tmp_path, base, train={"steps": 10})
    assert train(from_dict(extended), resume=True, log=lambda *a: None).step == 10


def test_bad_settings_are_refused_before_training(tmp_path, base, monkeypatch):
    def refused(raw, match, error=ConfigError):
        with pytest.raises(error, match=match):
            train(from_dict(raw), log=lambda *a: None)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()

    refused(lora_config(tmp_path, base, lora={"targets": ["q_prj"]}), "'q_prj' matches no linear layer")
    refused(config_dict(tmp_path, distributed={"strategy": "fsdp"}), "strategy is 'fsdp'.*one process.*torchrun")
    refused(config_dict(tmp_path, distributed={"strategy": "fsdp", "cpu_offload": True}), "cpu_offload")
    with pytest.raises(ConfigError, match="LoRA adapts a trained model: set model.init_from"):
        from_dict(config_dict(tmp_path, lora={"r": 4}))
    with pytest.raises(ConfigError, match="cpu_offload needs distributed.strategy = 'fsdp'"):
        from_dict(config_dict(tmp_path, distributed={"cpu_offload": True}))

    # an adapter trained for another base, or with other settings
    other = make_tiny_model_dir(tmp_path / "other", seed=2, hidden_size=32)
    theirs = train(from_dict(lora_config(tmp_path, other, train={"steps": 1, "out_dir": str(tmp_path / "o")})),
                   log=lambda *a: None).checkpoint
    refused(lora_config(tmp_path, base, lora={"adapter": str(theirs)}), "trained for another base model: it has "
            "hidden_size 32 .this base: 64", CheckpointError)
    refused(lora_config(tmp_path, other, lora={"adapter": str(theirs), "r": 8}), "has r=4.*expected r=8",
            CheckpointError)

    # more memory than the device has
    monkeypatch.setattr(memory, "device_memory", lambda device, ranks=None: (1000, "a test device"))
    refused(config_dict(tmp_path), r"needs about .* GB per rank before activations .*a test device.*--dry-run")
