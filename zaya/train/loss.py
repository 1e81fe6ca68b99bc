"""The training loss: cross-entropy over the LM head, computed in chunks of tokens.

ZAYA1-8B's vocabulary has 262,272 entries, so the logits of one 4096-token sequence take 2 GB in
bf16, and the fp32 copy the loss reads, the log-softmax it keeps for backward and the gradient
flowing back take another 10 GB. ``LossModel`` instead runs the head and the loss on
``CHUNK_ELEMENTS / vocab`` tokens at a time under activation checkpointing: only the hidden
states are kept, each chunk's logits are recomputed in backward, and at most one chunk's logits
exist at any moment. A small vocabulary fits in one chunk, which computes exactly what the
unchunked loss computes.

The model and its loss are one module so that FSDP, whose root unit holds the embedding table
tied to the head, gathers it once for both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 26  # logits per chunk: 64M (256 MB in fp32)


def token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over the masked-in targets (fp32 logits, as the reference's LM head)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    return (ce * mask.flatten()).sum()


def chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


class LossModel(nn.Module):
    """``forward(x, y, mask) -> (summed loss, expert counts)`` for a ``ZayaForCausalLM``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor):
        h, counts = self.lm.model(x, expert_counts=True)
        head = self.lm.lm_head
        step = chunk_tokens(self.lm.config.vocab_size)
        if y.numel() <= step:
            return token_loss(head(h), y, mask), counts
        h, y, mask = h.flatten(0, 1)[:, None], y.reshape(-1, 1), mask.reshape(-1, 1)
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, h.shape[0], step):
            part = slice(i, i + step)
            total = total + checkpoint(lambda hc, yc, mc: token_loss(head(hc), yc, mc), h[part], y[part], mask[part],
                                       use_reentrant=False)
        return total, counts
