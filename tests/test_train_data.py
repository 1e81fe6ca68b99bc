"""Trainer pieces that need no training: config checks, data encoding/packing/order, the controller."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.tiny_train import config_dict, write_chat, write_config

from zaya.errors import ConfigError
from zaya.tokenizer import Tokenizer
from zaya.train import config as config_mod
from zaya.train.balance import BalanceController, load_stats
from zaya.train.data import DataError, Document, Encoder, Order, build, pack_bfd, pack_stream, read_documents


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.from_dir(tokenizer_dir)


def masked_text(tok, doc: Document, keep: bool = True) -> str:
    return tok.decode([i for i, m in zip(doc.ids, doc.mask) if m == keep])


# ------------------------------------------------------------------------------------ config
def test_config_round_trip_and_overrides(tmp_path):
    path = write_config(tmp_path)
    cfg = config_mod.load_config(path, ["train.steps=9", "balance.enabled=false", "optim.lr=1"])
    assert (cfg.train.steps, cfg.balance.enabled, cfg.optim.lr) == (9, False, 1.0)
    assert cfg.model.shape["hidden_size"] == 32
    assert config_mod.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("change, message", [
    ({"train": {"stepz": 3}}, "unknown key(s) ['stepz'] in [train]"),
    ({"optim": {"lr": "fast"}}, "optim.lr must be a number"),
    ({"train": {"global_batch": 6, "micro_batch": 4}}, "must be a multiple of train.micro_batch"),
    ({"train": {"precision": "fp8"}}, "train.precision must be one of"),
    ({"balance": {"betas": [0.9]}}, "balance.betas must be two numbers"),
    ({"model": {"init_from": "somewhere"}}, "remove ["),
    ({"extra": {}}, "unknown section(s) ['extra']"),
])
def test_bad_config_names_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        config_mod.from_dict(config_dict(tmp_path, **change))
    assert message in str(err.value)


def test_recipe_parses_and_its_files_exist(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    cfg = config_mod.load_config(root / "recipes" / "train-tiny.toml")
    config_mod.check_files(cfg)
    assert cfg.balance.enabled and cfg.balance.lr == 1e-3 and cfg.train.steps == 400


def test_missing_files_fail_before_training(tmp_path):
    cfg = config_mod.from_dict(config_dict(tmp_path, data={"train": [str(tmp_path / "nope.txt")]}))
    with pytest.raises(ConfigError, match="nope.txt does not exist"):
        config_mod.check_files(cfg)
    cfg = config_mod.from_dict(config_dict(tmp_path, data={"train": [str(tmp_path / "none/*.jsonl")]}))
    with pytest.raises(ConfigError, match="matches no files"):
        config_mod.check_files(cfg)
    cfg = config_mod.from_dict(config_dict(tmp_path, model={"tokenizer": str(tmp_path)}))
    with pytest.raises(ConfigError, match="has no tokenizer.json"):
        config_mod.check_files(cfg)


# -------------------------------------------------------------------------------------- data
def test_text_document_is_all_targets_and_ends_with_eos(tok):
    doc = Encoder(tok).text("hello world")
    assert doc.ids[0] == tok.bos_id and doc.ids[-1] in tok.eos_ids
    assert all(doc.mask)


def test_chat_mask_covers_assistant_turns_only(tok):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 12 + 30?"},
            {"role": "assistant", "content": "42", "reasoning_content": "add them"},  # dropped by the template
            {"role": "user", "content": "And 1 + 1?"},
            {"role": "assistant", "content": "2", "reasoning_content": "easy"}]
    doc = Encoder(tok).chat(msgs)
    assert masked_text(tok, doc) == "42<end_of_turn>\neasy\n</think>\n\n2<end_of_turn>\n"
    prompt = masked_text(tok, doc, keep=False)
    assert "What is 12 + 30?" in prompt and "Be brief." in prompt and prompt.endswith("model\n<think>\n")


def test_problem_records_mask_the_prompt(tok):
    chat = Encoder(tok).record({"problem": "What is 2 + 2?", "solution": "4"})
    assert masked_text(tok, chat) == "4<end_of_turn>\n"
    raw = Encoder(tok, problem_style="raw").record({"prompt": "What is 2 + 2?", "completion": " 4"})
    assert raw.ids[0] == tok.bos_id and masked_text(tok, raw) == " 4<end_of_turn>"


def test_bad_records_name_file_and_line(tmp_path, tok):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"question": "?"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: unknown record format with keys \['question'\]"):
        read_documents([path], Encoder(tok))
    path.write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1: not valid JSON"):
        read_documents([path], Encoder(tok))


def docs_of(lengths):
    out, next_id = [], 10
    for n in lengths:
        out.append(Document(list(range(next_id, next_id + n)), [j % 3 != 0 for j in range(n)]))
        next_id += n
    return out


def test_stream_packing_trains_every_target_once():
    docs = docs_of([5, 40, 17, 3, 60])
    packed = pack_stream(docs, seq_len=16, pad_id=0)
    assert packed.ids.shape[1] == 17
    flat = [t for d in docs for t in d.ids]
    flat_mask = [m for d in docs for m in d.mask]
    seen = [int(packed.ids[r, c]) for r in range(len(packed)) for c in range(1, 17) if packed.mask[r, c]]
    assert seen == [t for t, m in zip(flat[1:], flat_mask[1:]) if m]
    assert torch.equal(packed.ids[1:, 0], packed.ids[:-1, -1])  # windows overlap by one token


def test_bfd_packing_keeps_documents_whole():
    docs = docs_of([5, 12, 17, 3, 9, 40])
    packed = pack_bfd(docs, seq_len=16, pad_id=0)
    rows = [packed.ids[r].tolist() for r in range(len(packed))]
    for d in docs[:-1]:  # each short document sits contiguously in one row
        assert any(any(row[i:i + len(d.ids)] == d.ids for i in range(18 - len(d.ids))) for row in rows)
    assert len(packed) <= 7 and not packed.mask[packed.ids == 0].any()  # pads are never targets


def test_order_is_seeded_and_independent_of_world_size():
    order = Order(num_sequences=10, global_batch=8, micro_batch=2, seed=3)
    for step in range(4):
        one = torch.cat(order.micro_batches(step, 0, 1))
        two = [order.micro_batches(step, r, 2) for r in range(2)]
        assert sorted(one.tolist()) == sorted(torch.cat(two[0] + two[1]).tolist())
        assert torch.equal(one, order.step_rows(step))
    first_epoch = torch.cat([order.step_rows(0), order.step_rows(1)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # every sequence once per epoch
    assert not torch.equal(Order(10, 8, 2, seed=4).step_rows(0), order.step_rows(0))
    assert torch.equal(Order(10, 8, 2, seed=3).step_rows(5), order.step_rows(5))


def test_holdout_split_is_seeded_and_disjoint(tmp_path, tok):
    cfg = config_mod.from_dict(config_dict(tmp_path))
    a, b = build(cfg, tok), build(cfg, tok)
    assert torch.equal(a.train.ids, b.train.ids) and torch.equal(a.eval.ids, b.eval.ids)
    assert a.info["eval_documents"] == round(0.2 * 12)
    train_rows = {tuple(r) for r in a.train.ids.tolist()}
    assert not train_rows & {tuple(r) for r in a.eval.ids.tolist()}
    other = build(config_mod.from_dict(config_dict(tmp_path, train={"seed": 1})), tok)
    assert not torch.equal(other.train.ids, a.train.ids)


def test_chat_jsonl_builds(tmp_path, tok):
    write_chat(tmp_path / "chat.jsonl")
    cfg = config_mod.from_dict(config_dict(tmp_path, data={"train": [str(tmp_path / "chat.jsonl")], "holdout": 0,
                                                           "packing": "bfd"}))
    data = build(cfg, tok)
    assert data.eval is None and 0 < data.info["target_tokens"] < data.train.ids.numel() / 2


# ------------------------------------------------------------------------------- controller
class _Router(torch.nn.Module):
    def __init__(self, E):
        super().__init__()
        b = torch.zeros(E + 1)
        b[-1] = -1.0
        self.register_buffer("balancing_biases", b)


class _Model:
    def __init__(self, layers, E):
        self.config = type("C", (), {"num_experts": E})
        self.model = type("M", (), {"layers": [type("L", (), {"mlp": type("P", (), {"gate": _Router(E)})})
                                               for _ in range(layers)]})


def test_controller_is_bias_corrected_adam_on_the_load_error():
    E = 4
    model = _Model(2, E)
    ctl = BalanceController(model, lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    counts = torch.tensor([[70, 10, 10, 10, 0], [25, 25, 25, 25, 0]])
    ctl.update(counts)
    b0 = model.model.layers[0].mlp.gate.balancing_biases
    b1 = model.model.layers[1].mlp.gate.balancing_biases
    # first Adam step: m_hat / sqrt(v_hat) = sign(error), so every bias moves by lr against its error
    err = counts[0, :E] / 100 - 1 / E
    assert torch.allclose(b0[:E], -0.01 * err / (err.abs() + 1e-8), atol=1e-6)
    assert torch.equal(b1[:E], torch.zeros(E))  # an even load moves nothing
    assert b0[-1] == -1.0 and b1[-1] == -1.0     # the skip class stays frozen
    # a reference Adam on the same error sequence gives the same biases after several steps
    ref = torch.zeros(E, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.01, betas=(0.9, 0.999), eps=1e-8)
    ref.grad = err.float()
    opt.step()
    for c in ([40, 20, 20, 20, 0], [30, 30, 20, 20, 0], [10, 40, 30, 20, 0]):
        counts = torch.tensor([c, [25, 25, 25, 25, 0]])
        ctl.update(counts)
        ref.grad = (counts[0, :E] / 100 - 1 / E).float()
        opt.step()
    assert torch.allclose(b0[:E], ref.detach(), atol=1e-6)


def test_load_stats():
    s = load_stats(torch.tensor([[25, 25, 25, 25, 0], [100, 0, 0, 0, 0]]), 4)
    assert s["load_entropy_layers"] == [1.0, 0.0] and s["load_entropy"] == 0.5
    assert s["max_load"] == 4.0 and s["skip_frac"] == 0.0
    assert math.isclose(load_stats(torch.tensor([[50, 50, 0, 0, 100]]), 4)["skip_frac"], 0.5)
