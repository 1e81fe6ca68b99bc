"""Compiled decode steps (zaya.engine.compiled) against eager: same greedy tokens, logits within
rounding, eager when compiling fails, and how the ``compile`` setting (``--compile``,
``ZAYA_COMPILE``, auto) is decided."""

from __future__ import annotations

import pytest
import torch

import zaya
from tests.tiny_model import make_tiny_model
from zaya.cli import build_parser
from zaya.engine import Engine, Request
from zaya.engine import compiled, runner
from zaya.engine import engine as engine_module
from zaya.errors import ZayaError
from zaya.llm import LLM
from zaya.sampling import SamplingParams

PROMPTS = [[5, 17, 33, 101, 7, 250], [9, 44, 12]]


def greedy(engine: Engine, prompts, steps: int = 6):
    """Tokens of each prompt (decoded together by ``engine``) and the logits of every decode step."""
    logits = []

    def recording(model, batch, tokens, **kw):
        out = runner.forward(model, batch, tokens, **kw)
        if batch.S == 1:
            logits.append(out.clone())
        return out

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


@pytest.fixture()
def no_env(monkeypatch):
    monkeypatch.delenv("ZAYA_COMPILE", raising=False)


@torch.no_grad()
def test_compiled_decode_equals_eager(cache_dir, no_env):
    """compile="on" against compile="off": the same greedy tokens, decode logits within 1e-4."""
    torch._dynamo.reset()
    off = Engine(make_tiny_model(seed=3), compile="off")
    assert not off.compile.on and not compiled.is_compiled(off.model)
    eager_tokens, eager_logits = greedy(off, PROMPTS)
    model = make_tiny_model(seed=3)
    engine = Engine(model, compile="on")
    assert engine.compile.on and compiled.is_compiled(model)
    assert compiled.compile_decode(model) == 0  # already wrapped
    tokens, logits = greedy(engine, PROMPTS)
    assert compiled.compile_failures(model) == []
    assert tokens == eager_tokens
    assert len(logits) == len(eager_logits) > 0
    for a, b in zip(logits, eager_logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert any(cache_dir.rglob("*")), "Inductor's FX graph cache wrote nothing under ZAYA_COMPILE_CACHE"


def _broken_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


@torch.no_grad()
def test_failed_compile_falls_back_to_eager(cache_dir, monkeypatch):
    """An LLM asked for compile="on" whose compile fails: one warning, then eager's very bits."""
    torch._dynamo.reset()
    monkeypatch.setenv("ZAYA_COMPILE", "on")  # the explicit "off" wins over it
    eager_tokens, eager_logits = greedy(LLM(make_tiny_model(seed=4), compile="off").engine(), PROMPTS[:1])
    model = make_tiny_model(seed=4)
    monkeypatch.setattr(compiled, "BACKEND", _broken_backend)
    llm = LLM(model, compile="on")
    assert llm.compile.on
    with pytest.warns(RuntimeWarning, match="no compiler here"):
        tokens, logits = greedy(llm.engine(), PROMPTS[:1])
    assert tokens == eager_tokens
    for a, b in zip(logits, eager_logits):
        assert torch.equal(a, b)
    failures = compiled.compile_failures(model)
    assert len(failures) == 1 and failures[0].startswith("layer 0 attention_in") and "no compiler here" in failures[0]


def test_the_setting_flag_over_env_over_auto(monkeypatch):
    monkeypatch.delenv("ZAYA_COMPILE", raising=False)
    assert compiled.resolve() == "auto"
    for value, mode in (("", "auto"), ("auto", "auto"), ("0", "off"), ("off", "off"), ("1", "on"), ("ON", "on")):
        monkeypatch.setenv("ZAYA_COMPILE", value)
        assert compiled.resolve() == mode, value
        for explicit in compiled.MODES:  # an explicit setting wins over the environment
            assert compiled.resolve(explicit) == explicit
    monkeypatch.setenv("ZAYA_COMPILE", "yes please")
    with pytest.raises(ZayaError, match="ZAYA_COMPILE must be 0/off, 1/on or auto, got 'yes please'"):
        compiled.resolve()
    assert compiled.resolve("off") == "off"  # a bad environment value does not matter when the flag is given
    with pytest.raises(ZayaError, match=r"compile must be one of auto, on, off \(--compile\), got 'true'"):
        compiled.resolve("true")
    with pytest.raises(ZayaError, match="compile must be one of"):
        LLM(make_tiny_model(), compile="fast")


def test_auto_follows_the_measured_table(monkeypatch):
    """auto: eager on CPU (what was measured) and on devices nobody measured; on where the table says."""
    monkeypatch.delenv("ZAYA_COMPILE", raising=False)
    cpu = compiled.decide(None, "cpu")
    assert (cpu.mode, cpu.source, cpu.on) == ("auto", "default", False)
    assert str(cpu).startswith("eager (compile auto, the default: on CPU the compiled step measured")
    assert compiled.decide("auto", torch.device("cuda", 0)) == compiled.Decision(
        "auto", "compile=", False, "on cuda the compiled step has not been measured")
    monkeypatch.setenv("ZAYA_COMPILE", "1")
    assert str(compiled.decide(None, "cpu")) == "compiled (ZAYA_COMPILE=on)"
    assert str(compiled.decide("off", "cpu")) == "eager (compile off)"
    monkeypatch.setenv("ZAYA_COMPILE", "auto")
    monkeypatch.setitem(compiled.AUTO, "cpu", (True, "measured faster here"))
    model = make_tiny_model()
    engine = Engine(model)  # nothing compiles before the first decode step
    assert engine.compile.on and compiled.is_compiled(model)
    assert str(engine.compile) == "compiled (ZAYA_COMPILE=auto: measured faster here)"


def test_load_passes_the_setting_to_every_engine(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ZAYA_COMPILE", "1")
    llm = zaya.load(tiny_model_dir, compile="off")
    assert llm.compile_setting == "off" and not llm.engine().compile.on and not compiled.is_compiled(llm.model)
    monkeypatch.delenv("ZAYA_COMPILE")
    llm = zaya.load(tiny_model_dir, compile="on")
    assert llm.engine().compile.on and compiled.is_compiled(llm.model)  # wrapped; compiles at the first step


@pytest.mark.parametrize("argv", [["generate", "hi"], ["chat"], ["serve"], ["solve", "1+1"], ["bench"], ["eval"]])
def test_the_compile_flag_parses(argv, capsys):
    parser = build_parser()
    assert parser.parse_args(argv).compile is None
    for mode in compiled.MODES:
        assert parser.parse_args([*argv, "--compile", mode]).compile == mode
    with pytest.raises(SystemExit):
        parser.parse_args([*argv, "--compile", "yes"])
    err = capsys.readouterr().err  # argparse quotes the choices or not, by Python version
    assert "argument --compile: invalid choice: 'yes' (choose from " in err and all(m in err for m in compiled.MODES)
