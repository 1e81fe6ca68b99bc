"""The paged cache: decode and chunked prefill equal a full forward, and a prefix-cache hit gives
the logits that recomputing gives, at every offset from a block boundary, for every CCA kernel
size, with sliding-window layers and quantized weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.tiny_model import make_tiny_model, make_tiny_model_dir
from zaya.engine.blocks import NULL_BLOCK, BlockPool, chain_hash, seed_hash
from zaya.engine.cache import PagedCache, parse_memory
from zaya.engine.runner import ForwardBatch
from zaya.errors import ZayaError

SLIDING = dict(num_hidden_layers=3, layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=6)
ALL_SLIDING = dict(num_hidden_layers=2, layer_types=["hybrid_sliding"] * 2, sliding_window=5)
BS = 4


def new_cache(model, block_size=BS, memory=2 << 20, **kw) -> PagedCache:
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    return PagedCache(model.config, dtype=dtype, device="cpu", memory=memory, block_size=block_size, max_seqs=8, **kw)


def ids(n, seed=0):
    return torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def block_chunks(start, end, bs=BS):
    """Chunk sizes that end on every block boundary between start and end."""
    cuts = [start] + list(range((start // bs + 1) * bs, end, bs)) + [end]
    return [b - a for a, b in zip(cuts, cuts[1:])]


@torch.no_grad()
def feed(model, cache, seq, tokens, chunks=None, **kw) -> torch.Tensor:
    """Run ``tokens`` (the sequence's next ones) in the given chunk sizes; logits (T, V)."""
    if len(seq.tokens) == seq.computed:
        seq.tokens.extend(tokens)
    out, start = [], 0
    for n in chunks or [len(tokens)]:
        assert cache.reserve(seq, n)
        batch = ForwardBatch(cache, [seq], n, **kw)
        out.append(model(torch.tensor([tokens[start:start + n]]), cache=batch)[0].float())
        cache.advance(seq, n)
        start += n
    return torch.cat(out)


def full(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0].float()


# ---------------------------------------------------------------------------------- no prefix hit
@pytest.mark.parametrize("overrides", [{}, SLIDING, ALL_SLIDING, dict(cca_time0=3, cca_time1=3)])
def test_prefill_then_decode_equals_full_forward(overrides):
    model = make_tiny_model(**overrides)
    x = ids(23)
    cache = new_cache(model)
    seq = cache.open([])
    got = torch.cat([feed(model, cache, seq, x[:7])] + [feed(model, cache, seq, [t]) for t in x[7:]])
    assert (got - full(model, x)).abs().max() < 1e-5
    assert seq.computed == 23


def test_chunked_prefill_equals_full_forward():
    model = make_tiny_model(**SLIDING)
    x = ids(20, seed=1)
    cache = new_cache(model)
    got = feed(model, cache, cache.open([]), x, chunks=[1, 6, 9, 4])
    assert (got - full(model, x)).abs().max() < 1e-5


def test_rows_of_different_lengths_decode_together_and_leave():
    """The paged replacement of a left-padded batch: each row has its own length."""
    model = make_tiny_model(**SLIDING)
    cache = new_cache(model)
    prompts = [ids(n, seed=n) for n in (3, 11, 6)]
    seqs = []
    for p in prompts:
        seqs.append(cache.open([]))
        feed(model, cache, seqs[-1], p)
    nxt = [[5], [6], [7]]
    with torch.no_grad():
        for s, t in zip(seqs, nxt):
            s.tokens += t
            assert cache.reserve(s, 1)
        step = model(torch.tensor(nxt), cache=ForwardBatch(cache, seqs, 1))[:, -1]
        for s in seqs:
            cache.advance(s, 1)
    for i, p in enumerate(prompts):
        assert (full(model, p + nxt[i])[-1] - step[i]).abs().max() < 1e-5
    used = cache.blocks_used()
    cache.close(seqs[1])  # row 1 finished: its blocks go back, the others are untouched
    assert cache.blocks_used() < used
    with torch.no_grad():
        for s in (seqs[0], seqs[2]):
            s.tokens += [9]
            assert cache.reserve(s, 1)
        again = model(torch.tensor([[9], [9]]), cache=ForwardBatch(cache, [seqs[0], seqs[2]], 1))[:, -1]
    assert (full(model, prompts[2] + [7, 9])[-1] - again[1]).abs().max() < 1e-5


def test_fork_shares_full_blocks_and_equals_independent_runs():
    model = make_tiny_model()
    cache = new_cache(model)
    x = ids(9, seed=2)
    parent = cache.open([])
    feed(model, cache, parent, x)
    children = [cache.fork(parent) for _ in range(2)]
    pool = cache.groups[0].pool
    assert [pool.ref[b] for b in parent.tables[0][:2]] == [3, 3]  # full blocks shared
    assert len({s.tables[0][2] for s in [parent] + children}) == 3  # the partial one copied
    for r, seq in enumerate([parent] + children):
        step = ids(3, seed=10 + r)
        got = torch.cat([feed(model, cache, seq, [t]) for t in step])
        assert (got - full(model, x + step)[9:]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------- prefix hits
def check_hit(model, cache, first, second, *, tol=1e-4):
    """Cache ``first``; run ``second`` through a hit; compare with recomputing it (within tol, the
    same greedy tokens) and, bit for bit, with recomputing it in the same chunking (one chunk
    per block, in both runs)."""
    a = cache.open([])
    feed(model, cache, a, first, block_chunks(0, len(first)))
    cache.close(a)
    b = cache.open(list(second))
    hit = cache.match(b)
    common = next((i for i, (s, t) in enumerate(zip(first, second)) if s != t), min(len(first), len(second)))
    assert hit == min(common, len(second) - 1) // cache.block_size * cache.block_size == b.cached_tokens
    got = feed(model, cache, b, second[hit:], block_chunks(hit, len(second)))
    want = full(model, second)[hit:]
    assert (got - want).abs().max() < tol
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    fresh = new_cache(model, cache.block_size, prefix_caching=False)
    same_chunks = feed(model, fresh, fresh.open([]), second, block_chunks(0, len(second)))
    assert torch.equal(got, same_chunks[hit:])
    cache.close(b)
    return hit


@pytest.mark.parametrize("overrides", [{}, SLIDING, ALL_SLIDING])
def test_hit_at_every_offset_from_a_block_boundary(overrides):
    model = make_tiny_model(**overrides)
    cache = new_cache(model)
    base = ids(3 * BS + 3, seed=3)
    hits = set()
    for shared in range(len(base) + 1):
        second = base[:shared] + ids(5, seed=100 + shared)
        hits.add(check_hit(model, cache, base, second))
    assert hits == {0, BS, 2 * BS, 3 * BS}


def test_full_prompt_hit_recomputes_the_last_block():
    model = make_tiny_model()
    cache = new_cache(model)
    x = ids(3 * BS, seed=4)
    assert check_hit(model, cache, x, x) == 2 * BS  # a whole-prompt hit backs off one block
    assert check_hit(model, cache, x + [7], x + [7]) == 3 * BS


@pytest.mark.parametrize("t0,t1", list(itertools.product(range(1, 5), repeat=2)))
def test_hit_for_every_cca_kernel_size(t0, t1):
    model = make_tiny_model(num_hidden_layers=2, cca_time0=t0, cca_time1=t1)
    cache = new_cache(model)
    base = ids(11, seed=t0 * 10 + t1)
    for shared in (BS - 1, BS, BS + 1, 2 * BS + 2):
        check_hit(model, cache, base, base[:shared] + ids(4, seed=shared))


def test_sliding_window_gives_back_blocks_and_still_hits():
    model = make_tiny_model(**SLIDING)
    cache = new_cache(model)
    seq = cache.open([])
    x = ids(60, seed=5)
    got = torch.cat([feed(model, cache, seq, x[:10])] + [feed(model, cache, seq, [t]) for t in x[10:]])
    assert (got - full(model, x)).abs().max() < 1e-4
    full_group, window_group = (sum(b != NULL_BLOCK for b in t) for t in seq.tables)
    assert full_group == 15 and window_group <= 4  # 6-token window in 4-token blocks, one spare
    assert cache.blocks_used() == 15
    cache.close(seq)
    check_hit(model, new_cache(model), x, x[:41] + ids(6, seed=6))


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_hit_with_quantized_weights(tmp_path, quantize):
    import zaya

    llm = zaya.load(make_tiny_model_dir(tmp_path, tokenizer=False), quantize=quantize)
    cache = new_cache(llm.model)
    base = ids(14, seed=7)
    for shared in (BS, 2 * BS + 1, 14):
        check_hit(llm.model, cache, base, base[:shared] + ids(3, seed=shared))


# ------------------------------------------------------------------------- pressure, rollback, errors
def test_eviction_takes_only_unreferenced_blocks_oldest_first():
    pool = BlockPool(5)
    a, b, c, d = (pool.allocate() for _ in range(4))
    with pytest.raises(IndexError):
        pool.allocate()  # every block in use: nothing is evicted
    root = seed_hash("m")
    for block in (a, b, c):
        pool.register(block, chain_hash(root, [block]), [block])
    pool.release(b)
    pool.release(a)  # cached, unreferenced: b is the least recently used
    pool.release(d)  # unnamed: straight to the free list
    assert pool.allocate() == d and pool.allocate() == b
    assert pool.lookup(chain_hash(root, [b]), [b]) is None and pool.lookup(chain_hash(root, [a]), [a]) == a
    assert pool.lookup(chain_hash(root, [a]), [a + 1]) is None  # token ids guard the name
    pool.acquire(a)  # a hit pulls a cached block back into use
    with pytest.raises(IndexError):
        pool.allocate()
    assert pool.ref[c] == 1 and pool.evictions == 1
    pool.release(c)
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(c)


def test_roots_differ_by_identity():
    model = make_tiny_model()
    assert new_cache(model, identity="a").root != new_cache(model, identity="b").root


def test_truncate_rolls_back_kv_and_cca_state():
    """The speculative-decoding hook: a forward of k+1 positions, then keep only some."""
    model = make_tiny_model(cca_time0=3, cca_time1=2)
    cache = new_cache(model)
    seq = cache.open([])
    x = ids(7, seed=8)
    feed(model, cache, seq, x)
    draft = [11, 12, 13, 14, 15]
    seq.tokens += draft
    assert cache.reserve(seq, 5)
    batch = ForwardBatch(cache, [seq], 5, keep_positions=True)
    with torch.no_grad():
        model(torch.tensor([draft]), cache=batch)
    cache.truncate(seq, 9, batch, 0)  # keep 11 and 12
    del seq.tokens[9:]
    assert seq.computed == 9 and len(seq.tables[0]) == 3
    got = feed(model, cache, seq, [40, 41])
    assert (got - full(model, x + [11, 12, 40, 41])[9:]).abs().max() < 1e-5


def test_budget_errors_name_the_flag():
    model = make_tiny_model()
    with pytest.raises(ZayaError, match="too small for one sequence.*cache_memory"):
        new_cache(model, memory=1000)
    assert parse_memory("2GiB") == 2 << 30 and parse_memory("512MB") == 512 * 10**6 and parse_memory(7) == 7
    with pytest.raises(ZayaError, match="cache size"):
        parse_memory("lots")


def test_used_bytes_counts_held_blocks_snapshots_and_slots():
    from zaya.engine.cache import bytes_per_block, state_bytes

    model = make_tiny_model()
    cache = new_cache(model)
    assert cache.used_bytes() == 0
    seq = cache.open(ids(40))
    assert cache.reserve(seq, 40)
    blocks = -(-40 // BS)
    assert cache.used_bytes() == blocks * bytes_per_block(model.config, torch.float32, BS) + \
        state_bytes(model.config, torch.float32)
    cache.close(seq)
    assert cache.used_bytes() == 0
