"""Compiled decode steps (zaya.engine.compiled) against eager: same greedy tokens, logits within
rounding, and eager when compiling fails."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import make_tiny_model
from zaya.engine import Engine, Request
from zaya.engine import compiled, runner
from zaya.engine import engine as engine_module
from zaya.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 101, 7, 250], [9, 44, 12]]


def greedy(model, prompts, steps: int = 6):
    """Tokens of each prompt (decoded together) and the logits of every decode step."""
    logits = []

    def recording(model, batch, tokens, **kw):
        out = runner.forward(model, batch, tokens, **kw)
        if batch.S == 1:
            logits.append(out.clone())
        return out

    engine = Engine(model)
    params = SamplingParams.from_kwargs(max_new_tokens=steps, temperature=0, ignore_eos=True)
    seqs = [s for i, p in enumerate(prompts) for s in engine.add(Request(p, params, prompt_index=i))]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "forward", recording)
        while engine.active:
            engine.step()
    return [s.token_ids for s in seqs], logits


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZAYA_COMPILE_CACHE", str(tmp_path / "inductor"))
    return tmp_path / "inductor"


@torch.no_grad()
def test_compiled_decode_equals_eager(cache_dir):
    torch._dynamo.reset()
    eager_tokens, eager_logits = greedy(make_tiny_model(seed=3), PROMPTS)
    model = make_tiny_model(seed=3)
    assert compiled.compile_decode(model) == 2 * model.config.num_hidden_layers
    assert compiled.compile_decode(model) == 0  # already wrapped
    tokens, logits = greedy(model, PROMPTS)
    assert compiled.compile_failures(model) == []
    assert tokens == eager_tokens
    assert len(logits) == len(eager_logits) > 0
    for a, b in zip(logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(cache_dir.rglob("*")), "Inductor's FX graph cache wrote nothing under ZAYA_COMPILE_CACHE"


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


@torch.no_grad()
def test_failed_compile_falls_back_to_eager(cache_dir):
    torch._dynamo.reset()
    eager_tokens, eager_logits = greedy(make_tiny_model(seed=4), PROMPTS[:1])
    model = make_tiny_model(seed=4)
    compiled.compile_decode(model, backend=_broken_backend)
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        tokens, logits = greedy(model, PROMPTS[:1])
    assert tokens == eager_tokens
    for a, b in zip(logits, eager_logits):
        assert torch.equal(a, b)
    failures = compiled.compile_failures(model)
    assert len(failures) == 1 and failures[0].startswith("layer 0 attention_in") and "no compiler here" in failures[0]


def test_the_switch(monkeypatch):
    for value, on in (("", False), ("0", False), ("off", False), ("1", True), ("on", True)):
        monkeypatch.setenv("ZAYA_COMPILE", value)
        assert compiled.enabled() is on
    monkeypatch.setenv("ZAYA_COMPILE", "yes please")
    with pytest.raises(ValueError, match="ZAYA_COMPILE must be"):
        compiled.enabled()
