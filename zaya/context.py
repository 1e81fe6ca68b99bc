"""ForwardContext: what every layer of one forward call shares.

Rope tables, the attention mask, where each query sits in the cache and where its keys are
written. The model builds one per call; layers only read it. Host-side facts (the kv length,
whether rows are aligned or padded) are read from the device once here, not once per layer.
"""

from __future__ import annotations

import torch

from zaya.config import ZayaConfig


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin [B, S, rotary_dim], computed in fp32 then cast (as the reference does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float, device=positions.device)
                                / rotary_dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class ForwardContext:
    """Per-call values every layer shares: rope tables, masks and the cache.

    Without a cache the call is a whole (optionally left-padded) batch. With one, each row is a
    sequence continuing from its own length; the cache (duck-typed, ``zaya.engine.cache``) says
    where: ``positions`` (B, S) the absolute position of each query, ``kv_len`` the longest row's
    length after this call, ``uniform`` whether every row has that length, and ``kv_offset(window)``
    the position of the first key its ``update`` returns for a layer with that window (keys are
    positions ``kv_offset .. kv_len - 1`` for every row; a shorter row's missing keys are masked).
    """

    def __init__(self, config: ZayaConfig, B: int, S: int, device, dtype, attention_mask, cache):
        self.cache, self.conv_mask = cache, None
        if cache is None:
            self.kv_len, self.uniform = S, True
            q_index = torch.arange(S, device=device).expand(B, S)
            starts = torch.zeros(B, dtype=torch.long, device=device)
            if attention_mask is not None:
                if not _is_left_padded(attention_mask):
                    raise ValueError("attention_mask must be left-padded (zeros only before the first 1)")
                starts = (attention_mask == 0).sum(-1)
                if S > 1 and not bool((attention_mask == 1).all()):
                    self.conv_mask = attention_mask[:, -S:]
            self.padded = attention_mask is not None and bool(starts.any())
            positions = (q_index - starts[:, None]).clamp_min(0)
        else:
            if attention_mask is not None:
                raise ValueError("attention_mask is not accepted with a cache: its rows carry their own lengths")
            self.kv_len, self.uniform, self.padded = cache.kv_len, cache.uniform, False
            q_index = positions = cache.positions
            starts = None
        self.q_index, self.starts = q_index, starts  # (B, S) absolute slot of each query; left padding per row
        self.rope = {t: rope_cos_sin(positions, config.rotary_dim(t), config.rope_parameters[t]["rope_theta"], dtype)
                     for t in set(config.layer_types)}
        self._masks: dict = {}

    def mask(self, window: int | None):
        """Boolean (B, 1, S, L) over the keys a layer attends to: causal, after the row's padding,
        inside the sliding window.

        A pad query row attends to itself only, which keeps it finite (it is never read). Returns
        None when nothing is masked (one query row per sequence, every row seeing all L keys) and
        "causal" when plain causal masking over a fresh, unpadded batch is all there is."""
        S = self.q_index.shape[1]
        offset = 0 if self.cache is None else self.cache.kv_offset(window)
        if self.uniform and not self.padded and offset == 0 and (window is None or self.kv_len <= window):
            if S == 1:
                return None
            if S == self.kv_len:
                return "causal"
        if window not in self._masks:
            q = self.q_index[:, :, None]
            kv = torch.arange(offset, self.kv_len, device=q.device)[None, None, :]
            allowed = kv <= q
            if self.starts is not None:
                allowed &= kv >= self.starts[:, None, None]
            if window is not None:
                allowed &= kv > q - window
            allowed |= kv == q
            self._masks[window] = allowed[:, None]
        return self._masks[window]


def _is_left_padded(mask: torch.Tensor) -> bool:
    # left padding means the mask never goes from 1 back to 0 along the sequence
    return bool((mask[:, 1:] >= mask[:, :-1]).all())
