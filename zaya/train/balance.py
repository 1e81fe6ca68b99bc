"""Router load balancing without an auxiliary loss: ZAYA1's AdamW-style bias controller.

Each MoE layer adds ``balancing_biases`` to its (detached) router probabilities to choose the
expert; the gate stays the unbiased probability, so the biases steer the choice and never enter
the gradient. After every optimizer step the controller reads the step's expert load, counted
over the whole global batch (all micro-batches, summed across data-parallel ranks so every rank
applies the same update), and moves each bias against its expert's load error (report eq. 5):

    p_e  = tokens routed to expert e / tokens routed          (this step, per layer)
    g_e  = p_e - 1/E                                          (E real experts)
    b_e <- b_e - lr * m_hat_e / (sqrt(v_hat_e) + eps)         (Adam moments of g, bias-corrected)

An over-used expert's bias falls and an idle one's rises. The bias integrates the error (the "I"
of the PID reading) while Adam's first moment smooths it and the second normalises its scale,
which the report credits for faster, steadier convergence than DeepSeek's fixed-size sign step.

Our choices where the report is silent (configurable in ``[balance]``):

* lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0: the values of AMD's Primus port
  (``zaya_balance_lr`` and torch's Adam defaults), the only public implementation of the update.
* One update per optimizer step, from counts summed over the global batch (Primus updates per
  forward pass; per step keeps the update independent of how the batch is split).
* The skip class (index E) is left out of the target and its bias stays frozen at -1. With
  probabilities in [0, 1] that keeps it out of reach while the expert biases stay near 0, and
  transformers 5.23's ``from_pretrained`` resets ``balancing_biases[-1]`` to -1 anyway, so any
  other value would change the logits of our checkpoints there. Tokens that do take the skip
  class still count in the denominator, so they push every expert's bias up.
"""

from __future__ import annotations

import math

import torch


class BalanceController:
    def __init__(self, model, *, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.routers = [layer.mlp.gate for layer in model.model.layers]
        self.num_experts = model.config.num_experts
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        device = self.routers[0].balancing_biases.device
        shape = (len(self.routers), self.num_experts)
        # fp32 moments, like the biases themselves: the selection arithmetic is fp32
        self.exp_avg = torch.zeros(shape, dtype=torch.float32, device=device)
        self.exp_avg_sq = torch.zeros(shape, dtype=torch.float32, device=device)
        self.steps = 0

    @torch.no_grad()
    def update(self, counts: torch.Tensor) -> None:
        """counts: (num_layers, E + 1) tokens per class over the global batch."""
        E = self.num_experts
        counts = counts.to(self.exp_avg.device, torch.float32)
        load = counts[:, :E] / counts.sum(-1, keepdim=True).clamp_min(1.0)
        error = load - 1.0 / E
        beta1, beta2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(error, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(error, error, value=1 - beta2)
        m_hat = self.exp_avg / (1 - beta1 ** self.steps)
        v_hat = self.exp_avg_sq / (1 - beta2 ** self.steps)
        delta = self.lr * m_hat / (v_hat.sqrt() + self.eps)
        for i, router in enumerate(self.routers):
            b = router.balancing_biases
            if self.weight_decay:
                b[:E].mul_(1 - self.lr * self.weight_decay)
            b[:E].sub_(delta[i].to(b.dtype))

    def state_dict(self) -> dict:
        return {"exp_avg": self.exp_avg.cpu(), "exp_avg_sq": self.exp_avg_sq.cpu(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.exp_avg.copy_(state["exp_avg"])
        self.exp_avg_sq.copy_(state["exp_avg_sq"])
        self.steps = int(state["steps"])


def load_stats(counts: torch.Tensor, num_experts: int) -> dict:
    """Normalised load entropy H(p)/ln E per layer and averaged (1 = perfectly even), the
    largest expert's load relative to even (1 = even, E = all tokens on one expert), and the
    fraction of tokens that took the skip class."""
    counts = counts.double().cpu()
    experts = counts[:, :num_experts]
    p = experts / experts.sum(-1, keepdim=True).clamp_min(1.0)
    entropy = (p * p.clamp_min(1e-30).log()).sum(-1).abs() / math.log(num_experts) if num_experts > 1 \
        else torch.ones(counts.shape[0], dtype=torch.float64)
    return {
        "load_entropy": float(entropy.mean()),
        "load_entropy_layers": [round(float(h), 5) for h in entropy],
        "max_load": float(p.max(-1).values.max() * num_experts),
        "skip_frac": float(counts[:, num_experts].sum() / counts.sum().clamp_min(1.0)),
    }
