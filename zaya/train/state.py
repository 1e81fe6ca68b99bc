"""Sharded training state: weights and AdamW moments through ``torch.distributed.checkpoint``.

Each rank writes the shards it holds (``train_state/__R_0.distcp`` plus one ``.metadata``); on
load each rank reads the pieces that overlap its own shards, so a run resumes on any number of
ranks and with either strategy: a 2-rank FSDP state loads into 1 process, 8 ranks into 4, a DDP
state into FSDP. Tensors are addressed by their names in the model (``get_state_dict``), never by
position. A LoRA run stores only what it trains (the adapters and their moments): its frozen base
is read again from ``model.init_from``. Everything is fp32, the precision it trains in, so a
resumed run continues exactly.

With several machines, every rank must see the same checkpoint directory (a shared filesystem),
as ``torch.distributed.checkpoint`` requires.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch.distributed as dist
from torch import nn

from zaya.errors import CheckpointError

STATE_DIR = "train_state"


def _dcp():
    # start-up time: torch.distributed.checkpoint takes about a second to import, which every zaya
    # command would pay (the CLI imports the trainer); only saving and resuming need it
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict

    return dcp, state_dict


@contextlib.contextmanager
def _world():
    """Keyword arguments for dcp.save / dcp.load: one process is a legitimate world of one here
    (not a forgotten init_process_group), so DCP's warning about it is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield {"no_dist": not dist.is_initialized()}


def save_state(path: Path, model: nn.Module, optimizer) -> None:
    """Write this rank's shards of the weights and optimizer state (call on every rank)."""
    dcp, sd = _dcp()
    model_sd, optim_sd = sd.get_state_dict(model, optimizer, options=sd.StateDictOptions(ignore_frozen_params=True))
    with _world() as kwargs:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), **kwargs)


def load_state(path: Path, model: nn.Module, optimizer) -> None:
    """Fill the model and optimizer from a state ``save_state`` wrote (any world size; every rank)."""
    if not (Path(path) / ".metadata").is_file():
        raise CheckpointError(f"{path} holds no sharded training state (.metadata is missing); a checkpoint "
                              "written by an older zaya cannot be resumed: fine-tune from it with model.init_from")
    dcp, sd = _dcp()
    model_sd, optim_sd = sd.get_state_dict(model, optimizer, options=sd.StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_sd, "optim": optim_sd}
    with _world() as kwargs:
        dcp.load(state, checkpoint_id=str(path), **kwargs)
    # dcp.load has filled every key get_state_dict asked for (it fails on a missing one); the frozen
    # base those keys leave out is not missing, hence strict=False
    sd.set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                      options=sd.StateDictOptions(ignore_frozen_params=True, strict=False))
