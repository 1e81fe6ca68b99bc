"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the trainer, and what sharded tensors need.

Every decoder block is one FSDP unit and the root (embedding, tied LM head, final norm, input
scaling) another. Between uses a rank holds 1/N of every parameter, of its gradient and of the
AdamW moments; a unit's parameters are all-gathered just before its forward and again for its
backward (the next unit's gather overlaps the current compute), and its gradients are
reduce-scattered right after. With ``precision = "bf16"`` parameters are gathered and computed in
bf16 while the sharded master weights, the gradient reduction and the optimizer stay fp32
(``MixedPrecisionPolicy``); forward inputs are not cast, so the residual stream stays fp32 as
in the reference. ``cpu_offload`` keeps the shards, gradients and optimizer state in host memory
(``CPUOffloadPolicy``; the optimizer step then runs on the CPU).

Experts are sharded like any parameter: the stacked (E, out, in) tensors split along E, and the
whole stack is gathered for the block's forward. Expert parallelism (experts living on different
ranks, tokens sent to them) is out of scope. The router's ``balancing_biases`` are buffers, which
FSDP leaves whole on every rank; the balancing controller keeps them equal (every rank applies the
same update from all-reduced counts).
"""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor. DTensor's module is read from ``sys.modules`` rather than
    imported: no tensor can be one before FSDP has imported it, and importing it costs about a
    second that every zaya command would pay (the CLI imports the trainer)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def shard(root: nn.Module, blocks, *, bf16: bool, cpu_offload: bool) -> None:
    """Make every decoder block, then the root, an FSDP unit (on any device, meta included)."""
    # start-up time: imported here, not with the module (see is_sharded)
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None, cast_forward_inputs=False)
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    # a block returns its expert choices as a view of topk's output; they are only ever read
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for block in blocks:
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(root, mp_policy=mp, offload_policy=offload)


def local_rows(t: torch.Tensor) -> slice | None:
    """The rows (dim 0) of the full tensor this rank holds, for a dim-0 sharded DTensor; None for
    a plain tensor (the rank holds it whole)."""
    if not is_sharded(t):
        return None
    mesh = t.device_mesh
    (placement,) = t.placements
    if not placement.is_shard(0):
        raise ValueError(f"expected a tensor sharded on dim 0, got {t.placements}")
    n, world, rank = t.shape[0], mesh.size(), mesh.get_local_rank()
    size = -(-n // world)  # torch.chunk's split, which FSDP2 uses
    rows = slice(min(n, rank * size), min(n, (rank + 1) * size))
    if rows.stop - rows.start != t.to_local().shape[0]:
        raise RuntimeError(f"sharded rows {rows} do not match the local shard {tuple(t.to_local().shape)}")
    return rows


@torch.no_grad()
def assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Store a full value into a parameter or buffer: all of it, or this rank's rows of a shard."""
    rows = local_rows(param)
    if rows is None:
        param.copy_(full)
    else:
        param.to_local().copy_(full[rows])


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded) tensor; a collective for sharded ones."""
    if not is_sharded(t):
        return t
    if t.device.type != t.device_mesh.device_type:  # shards offloaded to host memory gather on the device
        t = type(t).from_local(t.to_local().to(t.device_mesh.device_type), t.device_mesh, t.placements,
                               shape=t.shape, stride=t.stride())
    return t.full_tensor()


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale the gradients to a global 2-norm of at most ``max_norm``; returns the norm before.
    The norm of sharded gradients is summed over ranks, so every rank clips by the same factor."""
    params = [p for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if is_sharded(norm):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if is_sharded(t) else t
