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
    """Per-call values every layer shares: rope tables, masks, the cache and its write positions."""

    def __init__(self, config: ZayaConfig, B: int, S: int, device, dtype, attention_mask, cache):
        self.cache, self.fresh, self.write_start = cache, False, None
        if cache is None:
            kv_len, q_index = S, torch.arange(S, device=device).expand(B, S)
            starts = torch.zeros(B, dtype=torch.long, device=device)
            if attention_mask is not None:
                starts = (attention_mask == 0).sum(-1) if _is_left_padded(attention_mask) else None
                if starts is None:
                    raise ValueError("attention_mask must be left-padded (zeros only before the first 1)")
        else:
            lo, hi = (int(v) for v in torch.stack([cache.lengths.min(), cache.lengths.max()]).tolist())
            self.fresh = hi == 0
            if attention_mask is not None:
                if not self.fresh:
                    raise ValueError("attention_mask is only accepted for the first chunk of a sequence")
                if not _is_left_padded(attention_mask):
                    raise ValueError("attention_mask must be left-padded (zeros only before the first 1)")
                cache.starts.copy_((attention_mask == 0).sum(-1))
            starts = cache.starts
            q_index = cache.lengths[:, None] + torch.arange(S, device=device)
            kv_len = hi + S
            cache.reserve(kv_len)
            self.write_start = lo if lo == hi else None  # rows aligned: one slice write per layer
        self.kv_len = kv_len
        self.padded = bool(starts.any()) if attention_mask is not None or cache is not None else False
        self.q_index = q_index                            # (B, S) absolute slot of each query
        self.kv_index = torch.arange(kv_len, device=device)
        self.starts = starts
        positions = (q_index - starts[:, None]).clamp_min(0)
        self.rope = {t: rope_cos_sin(positions, config.rotary_dim(t), config.rope_parameters[t]["rope_theta"], dtype)
                     for t in set(config.layer_types)}
        self.conv_mask = None
        if attention_mask is not None and S > 1 and not bool((attention_mask == 1).all()):
            self.conv_mask = attention_mask[:, -S:]
        self._masks: dict = {}

    def mask(self, window: int | None):
        """Boolean (B, 1, S, kv_len): causal, after the row's padding, inside the sliding window.

        A pad query row attends to itself only, which keeps it finite (it is never read). Returns
        None when nothing is masked (one unpadded query row that sees the whole cache) and
        "causal" when plain causal masking over an unpadded fresh sequence is all there is."""
        S = self.q_index.shape[1]
        aligned = self.cache is None or self.write_start is not None  # every row has the same length
        if aligned and not self.padded and (window is None or self.kv_len <= window):
            if S == 1:
                return None
            if S == self.kv_len:
                return "causal"
        if window not in self._masks:
            q = self.q_index[:, :, None]
            kv = self.kv_index[None, None, :]
            allowed = (kv <= q) & (kv >= self.starts[:, None, None])
            if window is not None:
                allowed &= kv > q - window
            allowed |= kv == q
            self._masks[window] = allowed[:, None]
        return self._masks[window]


def _is_left_padded(mask: torch.Tensor) -> bool:
    # left padding means the mask never goes from 1 back to 0 along the sequence
    return bool((mask[:, 1:] >= mask[:, :-1]).all())
