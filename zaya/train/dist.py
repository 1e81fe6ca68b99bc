"""Data-parallel plumbing: torchrun's environment, the process group and the few collectives we need.

``torchrun --nproc-per-node N -m zaya.train CONFIG`` sets RANK / WORLD_SIZE / LOCAL_RANK and the
rendezvous address; we join with gloo on CPU and nccl on CUDA. Multi-node runs are the same
command with torchrun's ``--nnodes`` / ``--rdzv-endpoint``: nothing here is home-made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from zaya.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (a no-op in a single process)."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def init(device: str = "auto") -> DistEnv:
    """Join torchrun's process group when WORLD_SIZE > 1 and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but torch sees no CUDA device")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        owns = True
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world, local_rank, dev, owns)


def ddp_wrap(model, env: DistEnv):
    """``DistributedDataParallel`` over ``model``, without buffer broadcasts: the balancing biases
    are kept equal by construction (every rank applies the same update from all-reduced counts)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    no_sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel).parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None,
                                   **{no_sync: False})
