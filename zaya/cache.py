"""Decode state for every layer of a batch of sequences.

Per layer the cache holds the attention KV (keys after QK-norm, temp and RoPE), the CCA conv
state (the last ``conv_state_len`` raw pre-conv q‖k columns) and the previous token's delayed
value. Rows are sequences. Each row has its own ``lengths`` (slots written, padding included)
and ``starts`` (slots before it are left padding), so rows of different lengths decode together
and rows can be forked (n samples from one prefill), selected (finished rows freed) and merged
(a new request joins a running batch).

KV memory is allocated for what is asked (``reserve``) and grows geometrically when a row needs
more; nothing is sized to the model's maximum context up front.
"""

from __future__ import annotations

import torch

from zaya.errors import ContextLengthError


class Cache:
    def __init__(self, config, batch_size: int, capacity: int, *, dtype, device, max_context: int | None = None):
        self.config = config
        self.dtype, self.device = dtype, torch.device(device)
        self.max_context = max_context or config.max_position_embeddings
        L, Hkv, D = config.num_hidden_layers, config.num_key_value_heads, config.head_dim
        capacity = max(1, capacity)
        self.k = [torch.zeros(batch_size, Hkv, capacity, D, dtype=dtype, device=device) for _ in range(L)]
        self.v = [torch.zeros(batch_size, Hkv, capacity, D, dtype=dtype, device=device) for _ in range(L)]
        self.conv = [torch.zeros(batch_size, config.conv_channels, config.conv_state_len, dtype=dtype, device=device)
                     for _ in range(L)]
        self.vdelay = [torch.zeros(batch_size, Hkv * D // 2, dtype=dtype, device=device) for _ in range(L)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.starts = torch.zeros(batch_size, dtype=torch.long, device=device)

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for group in (self.k, self.v, self.conv, self.vdelay) for t in group)

    def reserve(self, slots: int) -> None:
        """Make room for ``slots`` positions per row, growing geometrically (never past max_context)."""
        if slots > self.max_context:
            raise ContextLengthError(f"sequence needs {slots} positions but the context limit is {self.max_context}")
        if slots <= self.capacity:
            return
        new = min(self.max_context, max(slots, 2 * self.capacity))
        pad = new - self.capacity
        self.k = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.k]
        self.v = [torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in self.v]

    # -- writes ---------------------------------------------------------------------------------
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, *, start: int | None = None,
                 kv_len: int | None = None):
        """Store k, v (B, Hkv, S, D) at each row's next S slots; return the filled KV prefix.

        ``start`` (the common length when every row has the same) and ``kv_len`` let a caller that
        already knows them skip reading ``lengths`` back (the model does so once per forward)."""
        B, _, S, _ = k.shape
        if kv_len is None:
            kv_len = int(self.lengths.max()) + S
            if bool((self.lengths == self.lengths[0]).all()):
                start = int(self.lengths[0])
        K, V = self.k[layer], self.v[layer]
        if start is not None:
            K[:, :, start:start + S] = k
            V[:, :, start:start + S] = v
        else:
            rows = torch.arange(B, device=k.device)[:, None]
            slots = self.lengths[:, None] + torch.arange(S, device=k.device)
            K[rows, :, slots] = k.transpose(1, 2)
            V[rows, :, slots] = v.transpose(1, 2)
        return K[:, :, :kv_len], V[:, :, :kv_len]

    # -- row management ---------------------------------------------------------------------------
    def _map_rows(self, fn) -> "Cache":
        out = Cache.__new__(Cache)
        out.config, out.dtype, out.device, out.max_context = self.config, self.dtype, self.device, self.max_context
        out.k, out.v = [fn(t) for t in self.k], [fn(t) for t in self.v]
        out.conv, out.vdelay = [fn(t) for t in self.conv], [fn(t) for t in self.vdelay]
        out.lengths, out.starts = fn(self.lengths), fn(self.starts)
        return out

    def fork(self, n: int) -> "Cache":
        """Each row repeated n times (rows r*n .. r*n+n-1 copy row r)."""
        return self if n == 1 else self._map_rows(lambda t: t.repeat_interleave(n, dim=0))

    def select(self, rows) -> "Cache":
        """Keep only ``rows`` (freeing the others); an empty list frees everything."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        out = self._map_rows(lambda t: t.index_select(0, index))
        out.trim()
        return out

    def trim(self) -> None:
        """Drop KV slots beyond the longest row (after rows were freed)."""
        longest = int(self.lengths.max()) if self.batch_size else 0
        if longest < self.capacity // 2:
            keep = max(1, longest)
            self.k = [t[:, :, :keep].clone() for t in self.k]
            self.v = [t[:, :, :keep].clone() for t in self.v]

    @staticmethod
    def merge(caches: list["Cache"]) -> "Cache":
        """Concatenate the rows of several caches (e.g. a new request joining a running batch)."""
        caches = [c for c in caches if c.batch_size]
        if len(caches) == 1:
            return caches[0]
        cap = max(c.capacity for c in caches)
        for c in caches:
            c.reserve(cap)
        first = caches[0]
        out = Cache.__new__(Cache)
        out.config, out.dtype, out.device, out.max_context = first.config, first.dtype, first.device, first.max_context
        cat = lambda name: [torch.cat([getattr(c, name)[i][:, :, :cap] if name in ("k", "v") else getattr(c, name)[i]
                                       for c in caches]) for i in range(len(first.k))]
        out.k, out.v, out.conv, out.vdelay = cat("k"), cat("v"), cat("conv"), cat("vdelay")
        out.lengths = torch.cat([c.lengths for c in caches])
        out.starts = torch.cat([c.starts for c in caches])
        return out
