"""Tiny random ZAYA checkpoints for tests (no downloads).

Every scale, bias, ``temp`` and balancing bias is randomised: the reference init sets them to 1
or 0, which would hide bugs in how they are applied.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.tiny_tokenizer import make_tokenizer_dir

TINY = dict(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=4, router_hidden_size=16,
            max_position_embeddings=1024, bos_token_id=2, eos_token_id=6, pad_token_id=0, dtype="float32")


def tiny_config(**overrides) -> dict:
    cfg = dict(TINY)
    cfg.update(overrides)
    return cfg


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, skip_bias: float = -1.0) -> torch.nn.Module:
    """Give every tensor of a zaya or transformers ZAYA model a random, non-trivial value (by name)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(shape, scale=1.0, shift=0.0):
        return torch.randn(shape, generator=g) * scale + shift

    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "temp":
            p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.5)
        elif leaf.endswith("scale") or leaf == "weight" and p.dim() == 1:
            p.copy_(rnd(p.shape, 0.2, 1.0))
        elif leaf.endswith("bias"):
            p.copy_(rnd(p.shape, 0.1))
        elif "conv_qk" in name:
            p.copy_(rnd(p.shape, 0.3))
        else:
            p.copy_(rnd(p.shape, 0.15))
    for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
        if name.endswith("balancing_biases"):
            b.copy_(rnd(b.shape, 0.1))
            b[-1] = skip_bias
    return model


def make_tiny_model(seed: int = 0, skip_bias: float = -1.0, **overrides):
    from zaya.model import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(seed)
    model = ZayaForCausalLM(ZayaConfig.from_dict(tiny_config(**overrides)))
    return randomize_(model, seed, skip_bias).eval()


def make_tiny_model_dir(path: Path, seed: int = 0, tokenizer: bool = True, skip_bias: float = -1.0,
                        max_shard_bytes: int | None = None, **overrides) -> Path:
    """A zaya-written checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    from zaya.checkpoint import save, state_for_saving

    path = Path(path)
    model = make_tiny_model(seed, skip_bias, **overrides)
    save(state_for_saving(model), model.config, path, max_shard_bytes=max_shard_bytes)
    if tokenizer:
        make_tokenizer_dir(path, vocab_size=model.config.vocab_size)
    return path


@torch.no_grad()
def greedy_reference(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation by re-running the whole sequence each step (no cache): the reference
    that a loaded model's cached decoding is compared with."""
    seq = list(prompt)
    for _ in range(new_tokens):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]
