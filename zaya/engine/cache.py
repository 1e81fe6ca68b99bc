"""The paged decode state of every sequence the engine holds: KV blocks, CCA state, prefix cache.

KV lives in fixed-size blocks (``block_size`` positions) of pools allocated once, sized by a
memory budget. Layers that attend alike share a pool (a *group*: the full-attention layers, and one
group per sliding window), so a sliding-window group can give back the blocks that fell out of
its window while the full-attention group keeps them. A sequence holds, per group, a block table
(the block id of each of its ``block_size`` chunks of positions; the null block where a sliding
group let go of one) and one *state slot*: its live CCA state (the last ``conv_state_len`` raw
q‖k columns and the previous token's delayed value, per layer).

Prefix caching (``blocks.BlockPool``): every full block is named by the hash chain of the tokens
up to its end, and beside each block of the first group sits a snapshot of the CCA state at its
end. A new sequence takes the longest run of cached blocks its tokens name (at least one token is
always left to compute, so the logits of the last one exist), adds itself as a user of them and
copies the snapshot at the run's end into its own slot: a shared snapshot is never written
through. Sequences only ever write into blocks they own alone: hits are whole blocks and a fork
copies its parent's partial last block.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch

from zaya.engine.blocks import NULL_BLOCK, BlockPool, chain_hash, seed_hash
from zaya.errors import ZayaError

DEFAULT_BLOCK_SIZE = 32
DEFAULT_MAX_SEQS = 256
DEFAULT_MEMORY_FRACTION = 0.25  # of the memory free at start, for the default budget
DEFAULT_SEQUENCES = 32          # ... but no more than this many full-context sequences need
# A sliding group keeps one block more than its window needs, so a speculative-decoding rollback
# of up to block_size tokens never needs a block it already gave back.
WINDOW_MARGIN_BLOCKS = 1
CACHE_FLAGS = "--cache-memory (cache_memory= in Python)"  # how a user raises the budget


class CacheFullError(ZayaError):
    """The pool cannot take the blocks asked for (the engine waits, or reports the budget)."""


@dataclass
class SeqCache:
    """One sequence's place in the cache."""

    tokens: list[int]              # every token whose KV is (or is about to be) computed, prompt first
    slot: int                      # live CCA state slot
    tables: list[list[int]]        # per group: block id of each block_size chunk of positions
    computed: int = 0              # positions whose KV and state are in the cache
    names: list[bytes] = field(default_factory=list)   # hash-chain names of its full blocks, in order
    dropped: list[int] = field(default_factory=list)   # per group: blocks before this index were let go
    cached_tokens: int = 0         # positions taken from the prefix cache when it started


@dataclass
class KVGroup:
    window: int | None             # None: full attention
    layers: list[int]
    pool: BlockPool
    kv: torch.Tensor               # (len(layers), 2, Hkv, num_blocks * block_size, D)


def bytes_per_block(config, dtype: torch.dtype, block_size: int) -> int:
    """KV of one block in every layer plus the CCA snapshot kept beside it."""
    e = torch.empty((), dtype=dtype).element_size()
    kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * block_size * e
    return kv + state_bytes(config, dtype)


def state_bytes(config, dtype: torch.dtype) -> int:
    """One CCA state (conv window and delayed value, every layer): a slot or a snapshot."""
    e = torch.empty((), dtype=dtype).element_size()
    per_layer = config.conv_channels * config.conv_state_len + config.num_key_value_heads * config.head_dim // 2
    return config.num_hidden_layers * per_layer * e


def free_memory(device) -> int:
    """Bytes free for the cache now: the accelerator's free memory, else the OS's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_memory(config, dtype, device, max_context: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   max_seqs: int = DEFAULT_MAX_SEQS) -> int:
    """The budget when none is given: a quarter of the free memory, capped at what
    ``DEFAULT_SEQUENCES`` full-context sequences need, and never below one full-context sequence
    while that fits in 60% of the free memory (below that, the pool is what there is)."""
    free = free_memory(device)
    fixed = max_seqs * state_bytes(config, dtype)
    per_seq = -(-max_context // block_size) * bytes_per_block(config, dtype, block_size)
    budget = min(int(free * DEFAULT_MEMORY_FRACTION), DEFAULT_SEQUENCES * per_seq + fixed)
    return max(budget, min(per_seq + fixed, int(free * 0.6)))


def pool_blocks(config, dtype, memory: int, block_size: int = DEFAULT_BLOCK_SIZE, max_seqs: int = DEFAULT_MAX_SEQS,
                flag: str = CACHE_FLAGS) -> int:
    """KV blocks a budget of ``memory`` bytes pays for, after the live state slots; ZayaError
    naming ``flag`` when that is too few for one sequence (its first block and the next)."""
    fixed = max_seqs * state_bytes(config, dtype)
    blocks = (memory - fixed) // bytes_per_block(config, dtype, block_size)
    if blocks < 2:
        need = fixed + 2 * bytes_per_block(config, dtype, block_size)
        raise ZayaError(f"a cache budget of {memory:,} bytes is too small for one sequence of this model "
                        f"(at least {need:,} bytes); raise {flag}")
    return blocks


def parse_memory(value) -> int | None:
    """Bytes from an int or a string with a unit ("4GiB", "512MB", "2g"); None stays None."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        raise ZayaError(f"cache memory must be a number of bytes or a size such as '4GiB', got {value!r}")
    units = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
             "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("abgikmt")
    unit = text[len(number):]
    try:
        amount = float(number)
    except ValueError:
        amount = -1
    if unit not in units or amount < 0:
        raise ZayaError(f"cannot read the cache size {value!r}: use bytes or a size such as '4GiB' or '512MB'")
    return int(amount * units[unit])


def layer_groups(config) -> list[tuple[int | None, list[int]]]:
    """(window, layers) per group, the full-attention layers first."""
    windows: dict[int | None, list[int]] = {}
    for i, kind in enumerate(config.layer_types):
        windows.setdefault(config.sliding_window if kind == "hybrid_sliding" else None, []).append(i)
    return sorted(windows.items(), key=lambda kv: (kv[0] is not None, kv[0] or 0))


class PagedCache:
    """Block pools, state slots and the prefix cache for one model (see the module docstring).

    ``memory`` is the budget in bytes (None: ``default_memory``); it pays for the KV pools, the
    snapshots and ``max_seqs`` live state slots. ``identity`` names the model and its weights'
    format (path, dtype, quantization): the root of the hash chain. ``lock`` serialises engines
    that share the cache."""

    def __init__(self, config, *, dtype, device, memory: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_seqs: int = DEFAULT_MAX_SEQS, max_context: int | None = None, identity: str = "",
                 prefix_caching: bool = True, flag: str = CACHE_FLAGS):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.block_size, self.max_seqs, self.flag = block_size, max_seqs, flag
        self.max_context = max_context or config.max_position_embeddings
        self.prefix_caching = prefix_caching
        self.default_budget = memory is None
        self.memory = default_memory(config, dtype, self.device, self.max_context, block_size, max_seqs) \
            if memory is None else memory
        self.num_blocks = pool_blocks(config, dtype, self.memory, block_size, max_seqs, flag) + 1  # + the null block
        self.root = seed_hash(f"{identity}|{config.to_dict()}|{dtype}|{block_size}")
        self.lock = threading.RLock()
        self._allocate_tensors()
        self.queried_tokens = self.hit_tokens = 0

    def _allocate_tensors(self) -> None:
        c, n, bs = self.config, self.num_blocks, self.block_size
        L, Hkv, D = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
        empty = lambda *shape: torch.empty(*shape, dtype=self.dtype, device=self.device)  # noqa: E731
        self.groups: list[KVGroup] = []
        self.group_of: list[tuple[int, int]] = [None] * L  # layer -> (group index, index in the group)
        for window, layers in layer_groups(c):
            # untouched pages cost no memory on a CPU; the null block is zeroed because padding reads it
            kv = empty(len(layers), 2, Hkv, n * bs, D)
            kv[:, :, :, :bs].zero_()
            for i, layer in enumerate(layers):
                self.group_of[layer] = (len(self.groups), i)
            self.groups.append(KVGroup(window, layers, BlockPool(n), kv))
        C, W, Hv = c.conv_channels, c.conv_state_len, Hkv * D // 2
        self.conv, self.vdelay = empty(L, self.max_seqs, C, W), empty(L, self.max_seqs, Hv)  # live slots
        self.conv_snap, self.vdelay_snap = empty(L, n, C, W), empty(L, n, Hv)  # beside group 0's blocks
        self.free_slots = list(range(self.max_seqs - 1, -1, -1))
        # per-layer views, so a forward's per-layer work does no indexing of its own
        self.layer_kv = [self.groups[g].kv[i] for g, i in self.group_of]       # (2, Hkv, slots, D)
        self.layer_k = [kv[0][None] for kv in self.layer_kv]                   # (1, Hkv, slots, D)
        self.layer_v = [kv[1][None] for kv in self.layer_kv]
        self.layer_conv, self.layer_vdelay = list(self.conv), list(self.vdelay)
        self.conv_width = W

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    @property
    def bytes_per_token(self) -> float:
        return bytes_per_block(self.config, self.dtype, self.block_size) / self.block_size

    def blocks_used(self) -> int:
        return self.groups[0].pool.used

    def blocks_free(self) -> int:
        return self.groups[0].pool.available

    def used_bytes(self) -> int:
        """Bytes holding the state of live sequences: the KV blocks in use in every group, the
        snapshots beside the first group's, and the state slots taken."""
        e = torch.empty((), dtype=self.dtype).element_size()
        kv = sum(g.pool.used * (g.kv.numel() // self.num_blocks) * e for g in self.groups)
        slots = self.max_seqs - len(self.free_slots)
        return kv + (self.blocks_used() + slots) * state_bytes(self.config, self.dtype)

    def blocks_needed(self, tokens: int) -> int:
        """Blocks of the first group a sequence of ``tokens`` positions holds at most."""
        group = self.groups[0]
        if group.window is None:
            return -(-tokens // self.block_size)
        return min(-(-tokens // self.block_size), self._window_blocks(group.window))

    def _window_blocks(self, window: int) -> int:
        return -(-window // self.block_size) + 1 + WINDOW_MARGIN_BLOCKS

    def fits(self, tokens: int) -> bool:
        """Whether one sequence of ``tokens`` positions fits in the pool at all."""
        return self.blocks_needed(tokens) <= self.num_blocks - 1

    @property
    def sequence_limit(self) -> int:
        """The longest sequence the pool can hold (a sliding-window-only model: any)."""
        if self.groups[0].window is not None and self.fits(2**62):
            return 2**62
        return self.capacity_tokens

    # -- sequences ------------------------------------------------------------------------------
    def open(self, tokens: list[int]) -> SeqCache:
        """A new, empty sequence (no blocks yet) with a state slot; CacheFullError without one."""
        if not self.free_slots:
            raise CacheFullError(f"all {self.max_seqs} sequence slots are in use")
        return SeqCache(list(tokens), self.free_slots.pop(), [[] for _ in self.groups],
                        dropped=[0] * len(self.groups))

    def close(self, seq: SeqCache) -> None:
        """Let go of a sequence's blocks (deepest first, so they are evicted first) and its slot."""
        for group, table in zip(self.groups, seq.tables):
            for block in reversed(table):
                group.pool.release(block)
            table.clear()
        if seq.slot >= 0:
            self.free_slots.append(seq.slot)
            seq.slot = -1

    def reserve(self, seq: SeqCache, n: int) -> bool:
        """Blocks for positions computed .. computed+n-1 in every group; False (nothing taken) when
        the pools cannot give them now."""
        need = -(-(seq.computed + n) // self.block_size)
        extra = [max(0, need - len(t)) for t in seq.tables]
        if any(k > g.pool.available for k, g in zip(extra, self.groups)):
            return False
        for k, group, table in zip(extra, self.groups, seq.tables):
            table.extend(group.pool.allocate() for _ in range(k))
        return True

    def advance(self, seq: SeqCache, n: int) -> None:
        """A forward wrote n more positions: name the blocks it filled, drop what left a window."""
        seq.computed += n
        self._name_full_blocks(seq)
        self._drop_out_of_window(seq)

    def fork(self, seq: SeqCache) -> SeqCache:
        """A copy of ``seq`` that shares its full blocks and owns a copy of its partial last block
        and of its state. CacheFullError when no slot or block is left."""
        child = self.open(seq.tokens)
        child.computed, child.names, child.dropped = seq.computed, list(seq.names), list(seq.dropped)
        child.cached_tokens = seq.cached_tokens
        partial = seq.computed % self.block_size
        full = seq.computed // self.block_size
        if partial and any(g.pool.available < 1 for g in self.groups):
            self.close(child)
            raise CacheFullError("no block left for a forked sequence")
        for group, mine, theirs in zip(self.groups, child.tables, seq.tables):
            for block in theirs[:full]:
                if block != NULL_BLOCK:
                    group.pool.acquire(block)
                mine.append(block)
            if partial:
                block = group.pool.allocate()
                mine.append(block)
                src, dst = theirs[full] * self.block_size, block * self.block_size
                group.kv[:, :, :, dst:dst + partial] = group.kv[:, :, :, src:src + partial]
        self.copy_state(seq.slot, child.slot)
        return child

    def copy_state(self, src: int, dst: int) -> None:
        self.conv[:, dst] = self.conv[:, src]
        self.vdelay[:, dst] = self.vdelay[:, src]

    def truncate(self, seq: SeqCache, length: int, batch, row: int) -> None:
        """Keep only the first ``length`` positions after a forward (``batch``, with
        ``keep_positions``) wrote more of them: the blocks past ``length`` are given back and the
        state is set to the one after position ``length - 1``, which that forward computed. This
        is the rollback of a rejected speculative draft; call it instead of ``advance``."""
        first = batch.starts[row]
        if not first < length <= first + batch.S:
            raise ValueError(f"can only keep positions {first + 1}..{first + batch.S}, not {length}")
        keep = -(-length // self.block_size)
        for group, table in zip(self.groups, seq.tables):
            while len(table) > keep:
                group.pool.release(table.pop())
        j = length - first - 1
        for layer, (qk, v_del) in enumerate(batch.kept):
            width = self.config.conv_state_len
            self.conv[layer, seq.slot] = qk[row, :, j + 1:j + 1 + width]
            self.vdelay[layer, seq.slot] = v_del[row, j]
        seq.computed = first
        self.advance(seq, length - first)

    # -- prefix cache ---------------------------------------------------------------------------
    def match(self, seq: SeqCache) -> int:
        """Start a new sequence from the longest cached prefix of its tokens; returns the number
        of positions taken (a multiple of block_size, always short of the last token)."""
        bs, tokens = self.block_size, seq.tokens
        if seq.computed or not self.prefix_caching:
            return 0
        self.queried_tokens += len(tokens)
        names, parent = [], self.root
        present = [[] for _ in self.groups]
        for i in range((len(tokens) - 1) // bs):
            chunk = tokens[i * bs:(i + 1) * bs]
            name = chain_hash(parent, chunk)
            found = [g.pool.lookup(name, chunk) for g in self.groups]
            if any(b is None and g.window is None for b, g in zip(found, self.groups)):
                break
            names.append(name)
            for p, b in zip(present, found):
                p.append(b)
            parent = name
        n = len(names)
        while n and not all(self._has_window(g, p, n) for g, p in zip(self.groups, present)):
            n -= 1
        if n == 0:
            return 0
        for group, table, blocks in zip(self.groups, seq.tables, present):
            lo = 0 if group.window is None else self._window_start(group.window, n * bs)
            for i in range(n):
                block = blocks[i] if i >= lo else NULL_BLOCK
                if block != NULL_BLOCK:
                    group.pool.acquire(block)
                table.append(block)
        self.conv[:, seq.slot] = self.conv_snap[:, present[0][n - 1]]
        self.vdelay[:, seq.slot] = self.vdelay_snap[:, present[0][n - 1]]
        seq.computed = seq.cached_tokens = n * bs
        seq.names = names[:n]
        self.hit_tokens += n * bs
        self._drop_out_of_window(seq)
        return n * bs

    def _window_start(self, window: int, length: int) -> int:
        """First block a sliding group still needs when the next query is at ``length``."""
        return max(0, length - window + 1) // self.block_size

    def _has_window(self, group: KVGroup, blocks: list, n: int) -> bool:
        lo = 0 if group.window is None else self._window_start(group.window, n * self.block_size)
        return all(b is not None for b in blocks[lo:n]) and blocks[n - 1] is not None

    def _name_full_blocks(self, seq: SeqCache) -> None:
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.names), seq.computed // bs):
            chunk = seq.tokens[i * bs:(i + 1) * bs]
            name = chain_hash(seq.names[-1] if seq.names else self.root, chunk)
            seq.names.append(name)
            for group, table in zip(self.groups, seq.tables):
                block = table[i]
                if block != NULL_BLOCK and group.pool.name[block] is None:
                    group.pool.register(block, name, chunk)

    def _drop_out_of_window(self, seq: SeqCache) -> None:
        for gi, (group, table) in enumerate(zip(self.groups, seq.tables)):
            if group.window is None:
                continue
            keep_from = max(0, self._window_start(group.window, seq.computed) - WINDOW_MARGIN_BLOCKS)
            for i in range(seq.dropped[gi], min(keep_from, len(table))):
                group.pool.release(table[i])
                table[i] = NULL_BLOCK
            seq.dropped[gi] = max(seq.dropped[gi], keep_from)

    # -- reporting ------------------------------------------------------------------------------
    def describe(self) -> str:
        """One line for a start-up message: the budget, what it holds and where it came from."""
        origin = (f"default: from {free_memory(self.device) / 2**30:,.1f} GiB free, set {self.flag} to change"
                  if self.default_budget else "set by " + self.flag.split()[0])
        return (f"KV cache {self.memory / 2**20:,.1f} MiB ({origin}): {self.num_blocks - 1:,} blocks of "
                f"{self.block_size} tokens = {self.capacity_tokens:,} tokens at {self.bytes_per_token:,.0f} bytes per "
                f"token, {self.max_seqs} sequence slots; prefix caching {'on' if self.prefix_caching else 'off'}")

    def stats(self) -> dict:
        return {"block_size": self.block_size, "blocks": self.num_blocks - 1, "blocks_used": self.blocks_used(),
                "blocks_free": self.blocks_free(), "memory_bytes": self.memory,
                "capacity_tokens": self.capacity_tokens, "bytes_per_token": self.bytes_per_token,
                "prefix_queried_tokens": self.queried_tokens, "prefix_hit_tokens": self.hit_tokens,
                "evictions": sum(g.pool.evictions for g in self.groups)}
