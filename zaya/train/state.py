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
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from zaya.errors import CheckpointError

STATE_DIR = "train_state"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# dcp.load has already filled every key get_state_dict asked for (it fails on a missing one); the
# frozen base those keys leave out is not missing
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextlib.contextmanager
def _dcp():
    """Keyword arguments for dcp.save / dcp.load: one process is a legitimate world of one here
    (not a forgotten init_process_group), so DCP's warning about it is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield {"no_dist": not dist.is_initialized()}


def save_state(path: Path, model: nn.Module, optimizer) -> None:
    """Write this rank's shards of the weights and optimizer state (call on every rank)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    with _dcp() as kwargs:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path), **kwargs)


def load_state(path: Path, model: nn.Module, optimizer) -> None:
    """Fill the model and optimizer from a state ``save_state`` wrote (any world size; every rank)."""
    if not (Path(path) / ".metadata").is_file():
        raise CheckpointError(f"{path} holds no sharded training state (.metadata is missing); a checkpoint "
                              "written by an older zaya cannot be resumed: fine-tune from it with model.init_from")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd}
    with _dcp() as kwargs:
        dcp.load(state, checkpoint_id=str(path), **kwargs)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_SET_OPTIONS)
