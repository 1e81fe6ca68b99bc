"""The fused decode step (zaya.fused, zaya/kernels/csrc/fused.cpp) against the eager layer it replaces.

Each fused layer call is checked against the eager layer on the same inputs and the same cache
state: the CCA state it writes must be the same bits, and the layer's outputs
equal up to the summation order of its reductions (the keys, after an L2 norm and RoPE, a
bf16 step or two apart where they differ) (attention is fp32 in the fused path at every
length; the eager path uses SDPA in bf16 below ``DECODE_ATTENTION_MIN_KEYS`` keys and fp32 above,
so past that length the outputs are compared tightly)."""

from __future__ import annotations

import pytest
import torch

import zaya
import zaya.kernels
from tests.tiny_model import make_tiny_model_dir
from zaya import fused
from zaya.cpu_attention import DECODE_ATTENTION_MIN_KEYS
from zaya.engine import Request
from zaya.fused import FusedLayer
from zaya.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not zaya.kernels.available(), reason="zaya's compiled kernels are unavailable")

SLIDING = dict(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=40)


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, (n,), generator=g).tolist() for n in lengths]


class _Checked:
    """Runs every fused layer call, then the eager layer on the same inputs and cache state, and
    records how far apart they are (the fused results go on). ``compare(after, live, out, ref,
    ctx, i)`` makes a record from the fused call's cache state and outputs (``after``, ``out``)
    and the eager layer's (``live``, ``ref``); the default one is for bf16."""

    def __init__(self, monkeypatch, compare=None):
        self.records = []
        compare = compare or self.bf16_record
        original = FusedLayer.__call__

        def call(layer_fused, layer, h, router_state, ctx):
            c, i = ctx.cache.cache, layer_fused.layer_idx
            live = (c.layer_conv[i], c.layer_vdelay[i], c.layer_kv[i])
            before = [t.clone() for t in live]
            out = original(layer_fused, layer, h, router_state, ctx)
            if out is None:
                return None
            after = [t.clone() for t in live]
            for t, b in zip(live, before):
                t.copy_(b)
            layer.fused = None
            try:
                ref = layer(h, router_state, ctx)
            finally:
                layer.fused = layer_fused
            self.records.append(compare(after, live, out, ref, ctx, i))
            return out

        monkeypatch.setattr(FusedLayer, "__call__", call)

    @staticmethod
    def bf16_record(after, live, out, ref, ctx, i) -> dict:
        # the conv window and delayed value are copies: the same bits; keys went through an L2
        # norm, whose sum may round the other way (then one bf16 step apart)
        states_equal = all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(after[:2], live))
        differ = after[2].view(torch.int16) != live[2].view(torch.int16)
        a, b = after[2][differ].float(), live[2][differ].float()
        kv_error = float(((a - b).abs() / b.abs().clamp_min(1e-3)).max()) if differ.any() else 0.0
        keys = ctx.kv_len - ctx.cache.layer_plans[i].offset
        state_index = isinstance(ctx.cache.slots, torch.Tensor)
        return dict(states_equal=states_equal, kv_error=kv_error, keys=keys, state_index=state_index,
                    h=float((out[0] - ref[0]).abs().max() / ref[0].abs().max()),
                    r=float((out[1].float() - ref[1].float()).abs().max() / ref[1].float().abs().max()),
                    index=torch.equal(out[2], ref[2]))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {"plain": make_tiny_model_dir(tmp_path_factory.mktemp("fused")),
            "sliding": make_tiny_model_dir(tmp_path_factory.mktemp("fused_sliding"), **SLIDING)}


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
@pytest.mark.parametrize("kind", ["plain", "sliding"])
def test_fused_layers_match_eager(model_dirs, monkeypatch, quantize, kind):
    llm = zaya.load(model_dirs[kind], dtype="bf16", quantize=quantize)
    assert all(layer.fused is not None for layer in llm.model.model.layers)
    checked = _Checked(monkeypatch)
    # rows of different lengths decode together (masks, index plans), one row alone (slice plans),
    # short and long caches (SDPA and fp32 attention on the eager side), block ends (snapshots)
    llm.generate(_prompts([9, 70, 150]), max_new_tokens=40, temperature=0, ignore_eos=True)
    llm.generate(_prompts([140], seed=1), max_new_tokens=24, temperature=0, ignore_eos=True)
    # the middle row finishes first: the others' state slots are no longer consecutive (index plans)
    engine = llm.engine()
    list(engine.run([Request(p, SamplingParams.from_kwargs(max_new_tokens=n, temperature=0, ignore_eos=True))
                     for p, n in zip(_prompts([20, 25, 30], seed=4), (40, 4, 40))]))
    rec = checked.records
    assert len(rec) >= 3 * (39 + 23 + 39)
    assert any(r["state_index"] for r in rec)
    assert all(r["states_equal"] for r in rec) and max(r["kv_error"] for r in rec) <= 2 ** -6
    assert sum(r["kv_error"] == 0 for r in rec) >= 0.9 * len(rec)
    long = [r for r in rec if r["keys"] > DECODE_ATTENTION_MIN_KEYS]
    assert long and max(r["h"] for r in long) <= 4e-3 and max(r["r"] for r in long) <= 2e-2
    assert max(r["h"] for r in rec) <= 3e-2 and max(r["r"] for r in rec) <= 5e-2
    assert sum(r["index"] for r in rec) >= 0.98 * len(rec)


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_fused_greedy_tokens_equal_eager(model_dirs, quantize):
    """Past the length where the eager path's attention is fp32 too, greedy decoding gives the same
    tokens, alone and batched, and from the prefix cache (its CCA snapshots written by the fused step)."""
    llm = zaya.load(model_dirs["plain"], dtype="bf16", quantize=quantize)
    prompts = _prompts([160, 200], seed=2)
    runs = {}
    for mode in ("fused", "eager", "fused again"):
        if mode == "eager":
            fused.uninstall(llm.model)
        else:
            assert fused.install(llm.model) == llm.config.num_hidden_layers
        alone = [llm.generate([p], max_new_tokens=24, temperature=0, ignore_eos=True)[0].token_ids for p in prompts]
        batched = [o.token_ids for o in llm.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
        runs[mode] = (alone, batched)
    assert runs["fused"] == runs["eager"] == runs["fused again"]


def test_fused_logits_close_to_eager_at_short_context(model_dirs):
    """Below DECODE_ATTENTION_MIN_KEYS the eager path's bf16 SDPA rounds its own way; the fused
    step's fp32 attention stays within bf16 noise of it."""
    llm = zaya.load(model_dirs["plain"], dtype="bf16")
    prompt = _prompts([12], seed=3)[0]
    out = {}
    for mode in ("fused", "eager"):
        if mode == "eager":
            fused.uninstall(llm.model)
        out[mode] = llm.generate([prompt], max_new_tokens=8, temperature=0, ignore_eos=True, logprobs=5)[0]
    assert out["fused"].token_ids[:2] == out["eager"].token_ids[:2]


def test_fused_step_is_off_without_kernels_or_when_asked(model_dirs, monkeypatch):
    monkeypatch.setenv("ZAYA_FUSED", "0")
    llm = zaya.load(model_dirs["plain"], dtype="bf16")
    assert all(layer.fused is None for layer in llm.model.model.layers)
    monkeypatch.setenv("ZAYA_FUSED", "1")
    monkeypatch.setattr(zaya.kernels, "available", lambda: False)
    assert fused.install(llm.model) == 0
    monkeypatch.setenv("ZAYA_FUSED", "maybe")
    with pytest.raises(ValueError):
        fused.enabled()


def test_float32_model_is_fused_and_matches_eager(model_dirs, monkeypatch):
    """A float32 model (the built-in one is) takes the fused step with ATen's matmuls inside:
    every layer call within float32 rounding of eager, and the same greedy tokens."""
    llm = zaya.load(model_dirs["sliding"], dtype="fp32")
    assert all(layer.fused is not None and layer.fused.max_rows == (256, 32) for layer in llm.model.model.layers)
    assert fused.verify_rows(llm.model) == 32

    def compare(after, live, out, ref, ctx, i):
        same_state = all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(after, live))
        return same_state, float((out[0] - ref[0]).abs().max() / ref[0].abs().max()), torch.equal(out[2], ref[2])

    records = _Checked(monkeypatch, compare).records
    prompts = _prompts([9, 70, 150], seed=5)
    fused_out = [o.token_ids for o in llm.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
    assert len(records) >= 3 * 23 and all(r[0] and r[1] < 1e-5 and r[2] for r in records)
    monkeypatch.undo()
    fused.uninstall(llm.model)
    eager_out = [o.token_ids for o in llm.generate(prompts, max_new_tokens=24, temperature=0, ignore_eos=True)]
    assert fused_out == eager_out


def test_fused_step_is_not_used_without_a_cache(model_dirs):
    bf = zaya.load(model_dirs["plain"], dtype="bf16")
    layer = bf.model.model.layers[0]
    calls = []
    original = layer.fused

    class Spy:
        def __call__(self, *args):
            out = original(*args)
            calls.append(out is not None)
            return out

    layer.fused = Spy()
    ids = torch.tensor([_prompts([6])[0]])
    bf.model(ids)  # a forward without a cache (prefill, scoring) never takes the fused step
    assert calls and not any(calls)


@pytest.mark.parametrize("dtype,quantize", [("bf16", None), ("bf16", "int4"), ("fp32", None)])
@pytest.mark.parametrize("kind", ["plain", "sliding"])
def test_verify_forwards_run_fused_and_equal_decoding(model_dirs, monkeypatch, dtype, quantize, kind):
    """A speculative verify forward runs fused and computes exactly what decoding its draft
    would: greedy tokens and their logprobs with drafting equal those without (bit for bit on
    zaya's kernels), through accepted and rejected drafts (rollback to a kept CCA state) and block ends inside a
    draft (snapshots)."""
    llm = zaya.load(model_dirs[kind], dtype=dtype, quantize=quantize)
    calls = []
    original = FusedLayer.__call__

    def spy(layer_fused, layer, h, router_state, ctx):
        out = original(layer_fused, layer, h, router_state, ctx)
        calls.append((h.shape[1], out is not None))
        return out

    monkeypatch.setattr(FusedLayer, "__call__", spy)
    g = torch.Generator().manual_seed(7)
    spans = [torch.randint(10, 512, (40,), generator=g).tolist() for _ in range(3)]
    prompts = [[2] + s + s[:20] for s in spans]  # a repeated span: prompt lookup drafts from it
    kw = dict(max_new_tokens=40, temperature=0, ignore_eos=True, logprobs=1)
    plain = llm.generate(prompts, **kw)
    spec = llm.generate(prompts, speculative=8, **kw)
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    if dtype == "bf16":  # the kernels' sums do not depend on the row count; ATen's float32 GEMMs may
        assert [o.logprobs for o in spec] == [o.logprobs for o in plain]
    else:
        assert all(abs(a - b) < 1e-4 for s, p in zip(spec, plain) for a, b in zip(s.logprobs, p.logprobs))
    assert sum(S > 1 and ok for S, ok in calls) >= 10 * llm.config.num_hidden_layers
    stats = llm.engine().spec_stats
    assert stats.accepted > 0 and stats.accepted < stats.drafted


def test_a_module_swapped_after_install_makes_the_step_decline(model_dirs):
    """A LoRA-style swap of a linear inside the CCA projection (its parent unchanged) is seen: the
    layer runs eager instead of the weights the fused step was built from."""
    llm = zaya.load(model_dirs["plain"], dtype="fp32")
    layer = llm.model.model.layers[1]
    assert layer.fused.current(layer)
    proj = layer.self_attn.qkv_proj
    original = proj.q_proj
    proj.q_proj = torch.nn.Linear(original.in_features, original.out_features, bias=original.bias is not None)
    assert not layer.fused.current(layer)
    proj.q_proj = original
    assert layer.fused.current(layer)
