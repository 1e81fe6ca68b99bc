"""One forward call's view of the paged cache: the object the model receives as ``cache``.

A `ForwardBatch` is B sequences each given S new tokens (a decode step: S = 1; a prefill chunk:
B = 1; a speculative verify: S = k + 1). It turns the sequences' block tables into what the layers
need, once per call: the query positions, per group of layers the slots its new keys are written
to and the slots its keys are read from (a slice of the pool when a row's blocks are consecutive,
else an index), the state slots, and the block ends inside the call whose CCA state becomes a
prefix-cache snapshot. The model calls ``read_state`` and ``update`` per layer (see
zaya.context for the attributes masks are built from).

Per call metadata, on the cache's device:
    positions      (B, S)  absolute position of each new token
    GroupPlan.write        (B*S,) pool slots of the new keys, or a slice for one row
    GroupPlan.read         (B*L,) pool slots of the keys attended to (null slot 0 past a row's
                           length), or a slice; L = kv_len - offset
    slots                  (B,) live CCA state slots, or a slice
    snapshots              (rows, columns, value index, blocks) of the block ends in this call
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zaya.engine.blocks import NULL_BLOCK
from zaya.engine.cache import PagedCache, SeqCache


@dataclass
class GroupPlan:
    offset: int                       # position of the first key read
    write: slice | torch.Tensor
    read: slice | torch.Tensor


def _index(ids: list[int], device) -> slice | torch.Tensor:
    """A slice when the ids are consecutive and ascending (a view, no gather), else an index."""
    if ids[-1] - ids[0] == len(ids) - 1 and all(b - a == 1 for a, b in zip(ids, ids[1:])):
        return slice(ids[0], ids[-1] + 1)
    return torch.tensor(ids, dtype=torch.long, device=device)


class ForwardBatch:
    def __init__(self, cache: PagedCache, seqs: list[SeqCache], S: int, *, keep_positions: bool = False):
        self.cache, self.S, self.B = cache, S, len(seqs)
        device = cache.device
        self.starts = [s.computed for s in seqs]
        self.lengths = [c + S for c in self.starts]
        self.kv_len = max(self.lengths)
        self.uniform = min(self.lengths) == self.kv_len
        fresh = [c == 0 for c in self.starts]
        if any(fresh) and not all(fresh):
            raise ValueError("a sequence with no cached positions is prefilled in a call of its own")
        self.fresh = fresh[0]
        if S == 1:
            self.positions = torch.tensor([[c] for c in self.starts], device=device)
        else:
            self.positions = torch.tensor(self.starts, device=device)[:, None] + torch.arange(S, device=device)
        self.slots = _index([s.slot for s in seqs], device)
        self.plans = [self._plan(g, [s.tables[g] for s in seqs]) for g in range(len(cache.groups))]
        self.offsets = {group.window: plan.offset for group, plan in zip(cache.groups, self.plans)}
        self.layer_plans = [self.plans[g] for g, _ in cache.group_of]
        self.snapshots = self._snapshot_plan(seqs)
        # each layer's raw q‖k columns and delayed values, for `PagedCache.truncate`
        self.kept = [None] * cache.config.num_hidden_layers if keep_positions else None

    # -- metadata -------------------------------------------------------------------------------
    def _plan(self, g: int, tables: list[list[int]]) -> GroupPlan:
        cache, bs, S = self.cache, self.cache.block_size, self.S
        window = cache.groups[g].window
        offset = 0 if window is None else min(max(0, c - window + 1) for c in self.starts) // bs * bs
        if self.B == 1:
            table, start = tables[0], self.starts[0]
            write = _index(table[start // bs:(start + S - 1) // bs + 1], cache.device)
            read = _index(table[offset // bs:(self.kv_len - 1) // bs + 1], cache.device)
            if isinstance(write, slice) and isinstance(read, slice) and NULL_BLOCK not in (write.start, read.start):
                first = write.start * bs + start % bs
                return GroupPlan(offset, slice(first, first + S), slice(read.start * bs, read.start * bs + self.kv_len - offset))
        width = max(len(t) for t in tables)
        blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=cache.device)
        if S == 1:  # decode: one slot per row, cheaper on the host than as tensor ops
            write = torch.tensor([t[c // bs] * bs + c % bs for t, c in zip(tables, self.starts)],
                                 dtype=torch.long, device=cache.device)
        else:
            pos = self.positions
            write = (blocks.gather(1, pos // bs) * bs + pos % bs).reshape(-1)
        slots = (blocks[:, :, None] * bs + torch.arange(bs, device=cache.device)).view(self.B, -1)
        read = slots[:, offset:self.kv_len]
        if not self.uniform:  # a shorter row reads the null slot past its length (masked anyway)
            kv = torch.arange(offset, self.kv_len, device=cache.device)
            lengths = torch.tensor(self.lengths, device=cache.device)
            read = torch.where(kv[None, :] < lengths[:, None], read, 0)
        return GroupPlan(offset, write, read.reshape(-1))

    def _snapshot_plan(self, seqs: list[SeqCache]):
        """Rows and in-call positions whose token ends a block, and group 0's block there."""
        bs, rows, js, blocks = self.cache.block_size, [], [], []
        for r, (seq, start) in enumerate(zip(seqs, self.starts)):
            for end in range((start // bs + 1) * bs, start + self.S + 1, bs):
                rows.append(r)
                js.append(end - 1 - start)
                blocks.append(seq.tables[0][end // bs - 1])
        if not rows:
            return None
        device, width = self.cache.device, self.cache.config.conv_state_len
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        j = t(js)
        return t(rows), j[:, None] + 1 + torch.arange(width, device=device), j, t(blocks)

    # -- what the model calls -------------------------------------------------------------------
    def kv_offset(self, window: int | None) -> int:
        return self.offsets[window]

    def read_state(self, layer: int):
        """(conv (B, C, conv_state_len), delayed value (B, Hkv*D/2)), or (None, None) for fresh rows."""
        if self.fresh:
            return None, None
        conv, vdelay = self.cache.layer_conv[layer], self.cache.layer_vdelay[layer]
        if isinstance(self.slots, slice):
            return conv[self.slots], vdelay[self.slots]
        return conv.index_select(0, self.slots), vdelay.index_select(0, self.slots)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, qk: torch.Tensor, v_del: torch.Tensor):
        """Store the new keys/values (B, Hkv, S, D) and CCA state; return the keys and values the
        layer attends to, (B, Hkv, L, D) each. (Written for few tensor ops: a decode step is
        bound by their count on a CPU.)"""
        cache, plan = self.cache, self.layer_plans[layer]
        kv = cache.layer_kv[layer]  # (2, Hkv, slots, D)
        if isinstance(plan.write, slice):
            kv[:, :, plan.write] = torch.cat((k, v))
        else:
            _, Hkv, N, D = kv.shape
            kv.view(2 * Hkv, N, D).index_copy_(
                1, plan.write, _same_dtype(torch.cat((k, v), 1).transpose(0, 1).reshape(2 * Hkv, -1, D), kv))
        self._save_state(layer, qk, v_del)
        if isinstance(plan.read, slice):
            keys, values = cache.layer_k[layer], cache.layer_v[layer]  # (1, Hkv, slots, D)
            start, length = plan.read.start, plan.read.stop - plan.read.start
            return keys.narrow(2, start, length), values.narrow(2, start, length)
        _, Hkv, N, D = kv.shape
        both = kv.view(2 * Hkv, N, D).index_select(1, plan.read).view(2, Hkv, self.B, -1, D).transpose(1, 2)
        return both[0], both[1]

    def _save_state(self, layer: int, qk: torch.Tensor, v_del: torch.Tensor) -> None:
        cache = self.cache
        conv, vdelay = qk[..., qk.shape[-1] - cache.conv_width:], v_del[:, -1]
        live_conv, live_vdelay = cache.layer_conv[layer], cache.layer_vdelay[layer]
        if isinstance(self.slots, slice):
            live_conv[self.slots] = conv
            live_vdelay[self.slots] = vdelay
        else:
            live_conv.index_copy_(0, self.slots, _same_dtype(conv, live_conv))
            live_vdelay.index_copy_(0, self.slots, _same_dtype(vdelay, live_vdelay))
        if self.snapshots is not None:
            rows, cols, j, blocks = self.snapshots
            cache.conv_snap[layer].index_copy_(0, blocks, qk[rows[:, None], :, cols].transpose(1, 2).to(cache.dtype))
            cache.vdelay_snap[layer].index_copy_(0, blocks, v_del[rows, j].to(cache.dtype))
        if self.kept is not None:
            self.kept[layer] = (qk, v_del)


def _same_dtype(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == like.dtype else x.to(like.dtype)


def forward(model, batch: ForwardBatch, tokens: torch.Tensor, *, last_only: bool = True) -> torch.Tensor:
    """Logits (B, V) of each row's last new token in fp32 (``last_only``), else (B, S, V)."""
    logits = model(tokens, cache=batch, last_only=last_only)
    return logits[:, -1].float() if last_only else logits.float()


def forward_rows(model, batch: ForwardBatch, tokens: torch.Tensor, last: list[int]) -> torch.Tensor:
    """Logits (B, V) in fp32 of row r's token at column ``last[r]`` (rows right-padded to one
    length): the head runs on those positions only."""
    S = tokens.shape[1]
    if all(j == S - 1 for j in last):
        return forward(model, batch, tokens)
    h, _ = model.model(tokens, None, batch)
    rows = torch.arange(len(last), device=h.device)
    picked = h[rows, torch.tensor(last, device=h.device)]
    return model.head(picked[:, None])[:, 0].float()
