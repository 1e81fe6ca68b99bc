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
        self.positions = torch.tensor(self.starts, device=device)[:, None] + torch.arange(S, device=device)
        self.slots = _index([s.slot for s in seqs], device)
        self.plans = [self._plan(g, [s.tables[g] for s in seqs]) for g in range(len(cache.groups))]
        self.offsets = {group.window: plan.offset for group, plan in zip(cache.groups, self.plans)}
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
        pos = self.positions
        write = (blocks.gather(1, pos // bs) * bs + pos % bs).reshape(-1)
        kv = torch.arange(offset, self.kv_len, device=cache.device)
        read = blocks[:, kv // bs] * bs + kv % bs
        lengths = torch.tensor(self.lengths, device=cache.device)
        read = torch.where(kv[None, :] < lengths[:, None], read, 0).reshape(-1)
        return GroupPlan(offset, write, read)

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
        cache = self.cache
        if isinstance(self.slots, slice):
            return cache.conv[layer, self.slots], cache.vdelay[layer, self.slots]
        return cache.conv[layer].index_select(0, self.slots), cache.vdelay[layer].index_select(0, self.slots)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, qk: torch.Tensor, v_del: torch.Tensor):
        """Store the new keys/values (B, Hkv, S, D) and CCA state; return the keys and values the
        layer attends to, (B, Hkv, L, D) each."""
        g, i = self.cache.group_of[layer]
        plan = self.plans[g]
        K, V = self.cache.groups[g].kv[i]  # (Hkv, slots, D) each
        if isinstance(plan.write, slice):
            K[:, plan.write] = k[0]
            V[:, plan.write] = v[0]
        else:
            Hkv, D = K.shape[0], K.shape[2]
            K.index_copy_(1, plan.write, k.transpose(0, 1).reshape(Hkv, -1, D).to(K.dtype))
            V.index_copy_(1, plan.write, v.transpose(0, 1).reshape(Hkv, -1, D).to(V.dtype))
        self._save_state(layer, qk, v_del)
        if isinstance(plan.read, slice):
            return K[None, :, plan.read], V[None, :, plan.read]
        Hkv, D, L = K.shape[0], K.shape[2], self.kv_len - plan.offset
        return (K.index_select(1, plan.read).view(Hkv, self.B, L, D).transpose(0, 1),
                V.index_select(1, plan.read).view(Hkv, self.B, L, D).transpose(0, 1))

    def _save_state(self, layer: int, qk: torch.Tensor, v_del: torch.Tensor) -> None:
        cache = self.cache
        width = cache.config.conv_state_len
        conv, vdelay = qk[..., qk.shape[-1] - width:], v_del[:, -1]
        if isinstance(self.slots, slice):
            cache.conv[layer, self.slots] = conv
            cache.vdelay[layer, self.slots] = vdelay
        else:
            cache.conv[layer].index_copy_(0, self.slots, conv.to(cache.dtype))
            cache.vdelay[layer].index_copy_(0, self.slots, vdelay.to(cache.dtype))
        if self.snapshots is not None:
            rows, cols, j, blocks = self.snapshots
            cache.conv_snap[layer].index_copy_(0, blocks, qk[rows[:, None], :, cols].transpose(1, 2).to(cache.dtype))
            cache.vdelay_snap[layer].index_copy_(0, blocks, v_del[rows, j].to(cache.dtype))
        if self.kept is not None:
            self.kept[layer] = (qk, v_del)


def forward(model, batch: ForwardBatch, tokens: torch.Tensor, *, last_only: bool = True) -> torch.Tensor:
    """Logits (B, V) of each row's last new token in fp32 (``last_only``), else (B, S, V)."""
    logits = model(tokens, cache=batch, last_only=last_only)
    return logits[:, -1].float() if last_only else logits.float()
