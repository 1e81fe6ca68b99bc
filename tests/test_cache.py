"""Cache semantics: prefill + decode, chunked prefill, forks and padding equal a full forward."""

from __future__ import annotations

import pytest
import torch

from tests.tiny_model import make_tiny_model
from zaya.cache import Cache

SLIDING = dict(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=4)


def new_cache(model, batch=1, capacity=64):
    return Cache(model.config, batch, capacity, dtype=torch.float32, device="cpu")


def ids(n, seed=0):
    return torch.randint(3, 512, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, SLIDING, dict(cca_time0=3, cca_time1=3)])
@torch.no_grad()
def test_prefill_then_decode_equals_full_forward(overrides):
    model = make_tiny_model(**overrides)
    x = ids(14)
    full = model(x)
    cache = new_cache(model, capacity=4)  # small on purpose: the cache must grow
    out = [model(x[:, :7], cache=cache)]
    for t in range(7, 14):
        out.append(model(x[:, t:t + 1], cache=cache))
    assert (torch.cat(out, 1) - full).abs().max() < 1e-5
    assert cache.lengths.tolist() == [14]


@torch.no_grad()
def test_chunked_prefill_equals_full_forward():
    model = make_tiny_model(**SLIDING)
    x = ids(20, seed=1)
    full = model(x)
    cache = new_cache(model)
    out = [model(x[:, s:s + n], cache=cache) for s, n in ((0, 1), (1, 6), (7, 9), (16, 4))]
    assert (torch.cat(out, 1) - full).abs().max() < 1e-5


@torch.no_grad()
def test_fork_equals_independent_runs():
    model = make_tiny_model()
    x = ids(9, seed=2)
    cache = new_cache(model)
    model(x, cache=cache)
    forked = cache.fork(3)
    steps = torch.randint(3, 512, (3, 4), generator=torch.Generator().manual_seed(3))
    batched = torch.cat([model(steps[:, t:t + 1], cache=forked) for t in range(4)], 1)
    for r in range(3):
        single = new_cache(model)
        model(x, cache=single)
        alone = torch.cat([model(steps[r:r + 1, t:t + 1], cache=single) for t in range(4)], 1)
        assert (alone[0] - batched[r]).abs().max() < 1e-5


@torch.no_grad()
def test_rows_of_different_lengths_decode_together_and_free():
    model = make_tiny_model(**SLIDING)
    prompts = [ids(n, seed=n) for n in (3, 11, 6)]
    caches, last = [], []
    for p in prompts:
        c = new_cache(model, capacity=p.shape[1] + 5)
        last.append(model(p, cache=c)[:, -1])
        caches.append(c)
    merged = Cache.merge(caches)
    nxt = torch.tensor([[5], [6], [7]])
    batched = model(nxt, cache=merged)[:, -1]
    for i, p in enumerate(prompts):
        ref = model(torch.cat([p, nxt[i:i + 1]], 1))[:, -1]
        assert (ref - batched[i]).abs().max() < 1e-5
    kept = merged.select([0, 2])  # row 1 finished: its memory is released
    assert kept.batch_size == 2 and kept.lengths.tolist() == [4, 7]
    again = model(torch.tensor([[8], [9]]), cache=kept)[:, -1]
    ref = model(torch.cat([prompts[2], torch.tensor([[7, 9]])], 1))[:, -1]
    assert (ref - again[1]).abs().max() < 1e-5
    assert merged.select([]).batch_size == 0


@torch.no_grad()
def test_left_padded_prefill_with_cache_equals_single_runs():
    model = make_tiny_model(**SLIDING)
    lengths, T = [8, 3], 8
    x = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        x[i, T - n:] = ids(n, seed=10 + i)
        mask[i, T - n:] = 1
    cache = new_cache(model, batch=2)
    model(x, attention_mask=mask, cache=cache)
    step = model(torch.tensor([[4], [4]]), cache=cache)[:, -1]
    for i, n in enumerate(lengths):
        ref = model(torch.cat([x[i:i + 1, T - n:], torch.tensor([[4]])], 1))[:, -1]
        assert (ref - step[i]).abs().max() < 1e-5


def test_context_limit_is_a_clear_error():
    model = make_tiny_model()
    cache = Cache(model.config, 1, 4, dtype=torch.float32, device="cpu", max_context=8)
    with pytest.raises(ValueError, match="context limit is 8"):
        with torch.no_grad():
            model(ids(9), cache=cache)
