"""End-to-end trainer tests on tiny configs: checkpoints, resume, NaN stop, balancing, fine-tuning, DDP."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir
from tests.tiny_train import config_dict, finish, losses, subprocess_env, torchrun, write_chat, write_config

import zaya
from zaya.chat import DEFAULT_CHAT_TEMPLATE
from zaya.errors import ConfigError
from zaya.train import TrainingError, from_dict, train
from zaya.train import loop as loop_mod
from zaya.train import loss as loss_mod
from zaya.train.checkpoints import complete_checkpoints, read_trainer_state


def run(tmp_path, **sections):
    return train(from_dict(config_dict(tmp_path, **sections)), log=lambda *a, **k: None)


def test_tiny_run_writes_checkpoints_zaya_and_transformers_load(tmp_path):
    result = run(tmp_path, train={"steps": 8, "save_every": 4, "eval_every": 4})
    assert result.step == 8 and result.checkpoint.name == "step-0000008"
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [4, 8]
    records = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tok_s", "load_entropy", "max_load", "skip_frac"} <= set(steps[0])
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert steps[-1]["loss"] < steps[0]["loss"]

    ckpt = result.checkpoint
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).is_file()
    assert read_trainer_state(ckpt)["step"] == 8  # weights_only load of the trainer state
    llm = zaya.load(ckpt)
    assert llm.tokenizer is not None and llm.config.num_hidden_layers == 2
    biases = llm.model.model.layers[0].mlp.gate.balancing_biases
    assert biases[:-1].abs().sum() > 0 and biases[-1] == -1.0  # the controller ran; skip stayed frozen
    ids = torch.tensor([llm.tokenizer.encode("the quick brown fox jumps over the lazy dog")])
    ours = llm.logits(ids)

    transformers = pytest.importorskip("transformers")
    hf = transformers.ZayaForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ref - ours).abs().max().item() < 1e-4


def test_resume_after_stop_reproduces_the_uninterrupted_run(tmp_path):
    common = {"steps": 10, "save_every": 3, "eval_every": 5}
    straight = run(tmp_path / "a", train=common)
    cfg = from_dict(config_dict(tmp_path / "b", train=common))
    stopped = train(cfg, stop_after=7, log=lambda *a: None)  # like a kill after step 7: last checkpoint is 6
    assert stopped.step == 7 and stopped.checkpoint.name == "step-0000006"
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg, log=lambda *a: None)
    resumed = train(cfg, resume=True, log=lambda *a: None)
    assert losses(resumed.metrics) == losses(straight.metrics)  # bit for bit on one process
    assert resumed.eval_loss == straight.eval_loss
    changed = from_dict(config_dict(tmp_path / "b", train=common, data={"seq_len": 16}))
    with pytest.raises(ConfigError, match="data.seq_len changed"):
        train(changed, resume=True, log=lambda *a: None)
    a = zaya.load(straight.checkpoint).model.state_dict()
    b = zaya.load(resumed.checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill(tmp_path):
    """Kill -9 a real training process partway, resume it, and compare with an uninterrupted run."""
    common = {"steps": 400, "save_every": 2, "keep_checkpoints": 3}
    path = write_config(tmp_path, train=common)
    proc = subprocess.Popen([sys.executable, "-m", "zaya.train", str(path)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_dir = tmp_path / "run"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = complete_checkpoints(run_dir)
        if done and done[-1][0] >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = complete_checkpoints(run_dir)[-1][0]
    assert killed_at < 400

    cfg = from_dict(config_dict(tmp_path, train=common))
    resumed = train(cfg, resume=True, stop_after=killed_at + 3, log=lambda *a: None)
    ref_cfg = from_dict(config_dict(tmp_path, train={**common, "out_dir": str(tmp_path / "ref")}))
    ref = train(ref_cfg, stop_after=killed_at + 3, log=lambda *a: None)
    got, want = losses(resumed.metrics), losses(ref.metrics)
    assert sorted(got) == list(range(1, killed_at + 4))
    for step in want:  # the killed process ran with its own thread settings: equal within float tolerance
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), step


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = loss_mod.token_loss
    calls = {"n": 0}

    def poisoned(logits, targets, mask):
        calls["n"] += 1
        loss = real(logits, targets, mask)
        return loss * float("nan") if calls["n"] > 2 * 4 else loss  # 2 micro-batches per step: step 5 fails

    real_run = loop_mod.Trainer.run

    def counted_run(self, *args, **kwargs):
        calls["n"] = 0  # count the training forwards only (the memory check before them runs the loss too)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(loss_mod, "token_loss", poisoned)
    monkeypatch.setattr(loop_mod.Trainer, "run", counted_run)
    with pytest.raises(TrainingError) as err:
        run(tmp_path, train={"steps": 8, "save_every": 2})
    message = str(err.value)
    assert "loss is nan at step 5" in message and "step-0000004" in message
    assert [s for s, _ in complete_checkpoints(tmp_path / "run")] == [2, 4]
    zaya.load(tmp_path / "run" / "checkpoints" / "step-0000004")


def test_balancing_raises_load_entropy_and_biases_stay_out_of_the_gradient(tmp_path):
    # The default controller (lr 1e-3) on a run of 120 tiny steps: routing collapses onto one expert
    # within a few steps either way; the controller pulls it back, without it the load stays skewed.
    # recipes/train-tiny.toml shows the same over 400 steps, reaching >= 0.95 (docs/training.md).
    common = {"train": {"steps": 120, "global_batch": 4, "micro_batch": 4}, "data": {"seq_len": 32, "holdout": 0},
              "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 10}}
    on = run(tmp_path / "on", **common)
    off = run(tmp_path / "off", balance={"enabled": False}, **common)

    def late_entropy(result):
        recs = [json.loads(line) for line in result.metrics.read_text().splitlines()]
        values = [r["load_entropy"] for r in recs if r["step"] > 60]
        return sum(values) / len(values)

    h_on, h_off = late_entropy(on), late_entropy(off)
    print(f"load entropy over steps 61-120: balancing {h_on:.3f}, without {h_off:.3f}")
    assert h_on > h_off + 0.2
    model = zaya.load(off.checkpoint).model
    assert all(torch.equal(layer.mlp.gate.balancing_biases, torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0]))
               for layer in model.model.layers)  # nothing but the controller touches them
    assert not any(name.endswith("balancing_biases") for name, _ in model.named_parameters())


def test_fine_tune_from_a_checkpoint_on_chat_data_in_bf16(tmp_path):
    base = make_tiny_model_dir(tmp_path / "base", seed=1)
    write_chat(tmp_path / "chat.jsonl", n=12)
    template = tmp_path / "template.jinja"
    template.write_text(DEFAULT_CHAT_TEMPLATE)
    raw = config_dict(tmp_path, train={"steps": 3, "precision": "bf16"},
                      data={"train": [str(tmp_path / "chat.jsonl")], "packing": "bfd", "holdout": 0.25,
                            "chat_template": str(template)})
    raw["model"] = {"init_from": str(base)}
    result = train(from_dict(raw), log=lambda *a: None)
    assert result.eval_loss is not None and torch.isfinite(torch.tensor(result.loss))
    ckpt = result.checkpoint
    assert (ckpt / "chat_template.jinja").read_text() == template.read_text()
    tuned = zaya.load(ckpt)
    assert json.loads((ckpt / "config.json").read_text())["hidden_size"] == 64
    reply = tuned.chat([{"role": "user", "content": "What is 2 + 2?"}], max_new_tokens=4, temperature=0)
    assert reply.completion.token_ids


def test_cli_plot_and_errors(tmp_path, capsys):
    import argparse

    from zaya.train.__main__ import main
    from zaya.train.cli import register

    parser = argparse.ArgumentParser(prog="zaya")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "c.toml", "--resume", "--set", "train.steps=3", "--plot", "x.png"])
    assert (args.config, args.resume, args.overrides, args.plot) == ("c.toml", True, ["train.steps=3"], "x.png")

    path = write_config(tmp_path, train={"steps": 3})
    assert main([str(path), "--plot", str(tmp_path / "m.png"), "--no-progress"]) == 0
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main([str(path), "--plot-only", "--plot", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").is_file()
    assert main([str(path)]) == 1  # checkpoints exist and --resume is not given
    assert "pass --resume" in capsys.readouterr().err
    assert main([str(path), "--set", "data.train=['missing/*.txt']"]) == 1
    assert "matches no files" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo) against 1 process, same global batch."""
    common = {"steps": 5, "global_batch": 8, "micro_batch": 2, "eval_every": 5}
    one = write_config(tmp_path, "one.toml", train={**common, "out_dir": str(tmp_path / "one")})
    two = write_config(tmp_path, "two.toml", train={**common, "out_dir": str(tmp_path / "two")})
    procs = [subprocess.Popen([sys.executable, "-m", "zaya.train", str(one)], env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT), torchrun(two)]
    for p in procs:
        finish(p)
    a, b = losses(tmp_path / "one" / "metrics.jsonl"), losses(tmp_path / "two" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(f"1 vs 2 processes: max relative loss difference {worst:.2e}")
    assert worst < 1e-5
    ea = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    eb = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines() if "eval_loss" in x]
    assert abs(ea[0]["eval_loss"] - eb[0]["eval_loss"]) < 1e-5
    ba = zaya.load(tmp_path / "one" / "checkpoints" / "step-0000005").model.model.layers[1].mlp.gate.balancing_biases
    bb = zaya.load(tmp_path / "two" / "checkpoints" / "step-0000005").model.model.layers[1].mlp.gate.balancing_biases
    assert torch.allclose(ba, bb, atol=1e-6)
