"""Parity with the reference implementation (transformers 5.23 ZayaForCausalLM) on tiny random configs."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import randomize_, tiny_config

transformers = pytest.importorskip("transformers")

import zaya  # noqa: E402

CONFIGS = {
    "base": dict(),
    "sliding": dict(num_hidden_layers=4, layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"],
                    sliding_window=5),
    "conv-3-2": dict(cca_time0=3, cca_time1=2),
    "conv-1-3": dict(cca_time0=1, cca_time1=3),
    "one-kv-head": dict(num_attention_heads=4, num_key_value_heads=1),
    "untied-bias": dict(tie_word_embeddings=False, lm_head_bias=True),
    "sharded": dict(_shard="20KB"),
    "skip-reachable": dict(_skip_bias=0.45),
}


def hf_checkpoint(tmp_path, name, dtype=torch.float32):
    cfg = dict(CONFIGS[name])
    shard = cfg.pop("_shard", None)
    skip_bias = cfg.pop("_skip_bias", -1.0)
    raw = {k: v for k, v in tiny_config(**cfg).items() if k != "dtype"}
    torch.manual_seed(0)
    hf = transformers.ZayaForCausalLM(transformers.ZayaConfig(**raw)).float().eval()
    randomize_(hf, seed=sum(map(ord, name)), skip_bias=skip_bias)
    path = tmp_path / name
    hf.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    if dtype != torch.float32:
        biases = {k: v.clone() for k, v in hf.state_dict().items() if k.endswith("balancing_biases")}
        hf = transformers.ZayaForCausalLM.from_pretrained(path, dtype=dtype).eval()
        # transformers 5.23's from_pretrained re-runs an unguarded `balancing_biases[-1] = -1` from its
        # _init_weights after loading, so it drops a checkpoint's skip-class bias; put the file's value back.
        hf.load_state_dict(biases, strict=False)
    return hf, path


def prompt(n, seed=0, vocab=512):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fp32_logits_and_greedy_match_reference(tmp_path, name):
    hf, path = hf_checkpoint(tmp_path, name)
    llm = zaya.load(path)
    if name == "sharded":
        assert len(list(path.glob("*.safetensors"))) > 1
    ids = prompt(12, seed=1)[None]
    with torch.no_grad():
        ref = hf(ids).logits
    ours = llm.logits(ids)
    diff = (ref - ours).abs().max().item()
    print(f"parity {name}: max |logit diff| = {diff:.3g}")
    assert diff < 1e-4

    # greedy: our cached engine against the reference's full forward, token by token
    seq = ids[0].tolist()
    ours = llm.generate([seq], max_new_tokens=32, temperature=0, ignore_eos=True)[0].token_ids
    ref_tokens = []
    with torch.no_grad():
        for _ in range(32):
            nxt = int(hf(torch.tensor([seq + ref_tokens])).logits[0, -1].argmax())
            ref_tokens.append(nxt)
    assert ours == ref_tokens


@pytest.mark.parametrize("name", ["base", "sliding"])
def test_left_padded_batch_matches_reference(tmp_path, name):
    hf, path = hf_checkpoint(tmp_path, name)
    llm = zaya.load(path)
    lengths = [11, 7, 3]
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, T - n:] = prompt(n, seed=i)
        mask[i, T - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    ours = llm.logits(ids, attention_mask=mask)
    assert torch.isfinite(ours).all()
    valid = mask.bool()
    assert (ref[valid] - ours[valid]).abs().max().item() < 1e-4
    for i, n in enumerate(lengths):  # and each row equals its own unpadded run
        single = llm.logits(ids[i:i + 1, T - n:])
        assert (single[0] - ours[i, T - n:]).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["base", "sliding", "skip-reachable"])
def test_bf16_within_bf16_tolerance(tmp_path, name):
    hf, path = hf_checkpoint(tmp_path, name, dtype=torch.bfloat16)
    llm = zaya.load(path, dtype="bfloat16")
    assert llm.model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = prompt(16, seed=3)[None]
    with torch.no_grad():
        ref = hf(ids).logits.float()
    ours = llm.logits(ids)
    diff = (ref - ours).abs().max().item()
    print(f"bf16 parity {name}: max |logit diff| = {diff:.3g} (logit scale {ref.abs().max():.3g})")
    assert diff <= 0.02 * ref.abs().max().item() + 1e-2
    agree = (ref.argmax(-1) == ours.argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_skip_class_outputs_zero_like_reference(tmp_path):
    """Layer by layer: the same tokens go to the skip class as in the reference, their MoE output
    is zero in both, and every MoE output matches the reference's."""
    hf, path = hf_checkpoint(tmp_path, "skip-reachable")
    llm = zaya.load(path)
    ids = prompt(24, seed=5)[None]
    ours, ref, ref_skip = {}, {}, {}

    def keep(store, i):
        def hook(module, args, out):  # the MoE output, one row per token
            store[i] = out[0].detach().flatten(0, -2)
        return hook

    def keep_skip(i, router):
        def hook(module, args, out):  # the reference's choice, before it masks the skip class away
            biased = out[0].detach().float().softmax(-1) + router.balancing_biases
            ref_skip[i] = biased.argmax(-1) == hf.config.num_experts
        return hook

    hooks = []
    for i, (a, b) in enumerate(zip(llm.model.model.layers, hf.model.layers)):
        hooks += [a.mlp.register_forward_hook(keep(ours, i)), b.mlp.register_forward_hook(keep(ref, i)),
                  b.mlp.gate.register_forward_hook(keep_skip(i, b.mlp.gate))]
    with torch.no_grad():
        logits, counts = llm.model(ids, expert_counts=True)
        ref_logits = hf(ids).logits
    for h in hooks:
        h.remove()
    assert counts[:, -1].sum() > 0, "the test config must actually route some tokens to the skip class"
    assert len(ours) == len(ref) == len(ref_skip) == hf.config.num_hidden_layers
    for i in range(len(ours)):
        skip = ref_skip[i]
        assert int(skip.sum()) == int(counts[i, -1]), f"layer {i}: skip tokens differ from the reference"
        assert torch.equal(ours[i][skip], torch.zeros_like(ours[i][skip])) and torch.equal(ref[i][skip], ours[i][skip])
        assert (ours[i] - ref[i]).abs().max().item() < 1e-5, f"layer {i}: MoE output differs from the reference"
    assert (logits - ref_logits).abs().max().item() < 1e-4
