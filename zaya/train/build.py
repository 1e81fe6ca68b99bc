"""The model a run trains, built without ever materialising more than one rank's share of it.

    config -> model on the meta device -> LoRA modules -> activation checkpointing
           -> FSDP units -> empty storage on the device -> values

Values come from one of three places: ``init_weights`` (from scratch), the ``init_from``
checkpoint read tensor by tensor (each rank reads only the rows of its own shards, with plain
file I/O, converting to the training dtype as it goes, so a 17.7 GB bf16 checkpoint never needs
17.7 GB, nor an fp32 copy of it, on one rank), or the sharded training state of a checkpoint
(resume, ``zaya.train.state``). Random values (scratch init, LoRA's A) are drawn whole from the
seed and cut into shards, so they do not depend on the number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from zaya.checkpoint import open_checkpoint, read_config
from zaya.checkpoint.adapters import adapter_values as read_adapter_values
from zaya.checkpoint.files import read_aligned
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError, ConfigError
from zaya.lora import apply_lora, init_adapters, is_adapter
from zaya.model import ZayaForCausalLM
from zaya.train import fsdp
from zaya.train.config import TrainConfig, lora_spec
from zaya.train.loss import LossModel


def model_config(cfg: TrainConfig, tokenizer, source: Path | None) -> ZayaConfig:
    """The checkpoint's config (fine-tuning, resuming), or the [model] shape sized to the tokenizer."""
    if source is not None:
        config, _ = read_config(Path(source))
        if config.quantization:
            raise ConfigError(f"{source} is quantized ({config.quantization}); train from the float checkpoint "
                              "(a quantized base cannot be fine-tuned: its kernels have no backward pass)")
        return config
    shape = {"vocab_size": -(-tokenizer.vocab_size // 64) * 64, "bos_token_id": tokenizer.bos_id,
             "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id, "dtype": "float32",
             **cfg.model.shape}
    try:
        return ZayaConfig.from_dict(shape)
    except ConfigError as exc:
        raise ConfigError(f"{cfg.source}: [model] {exc}") from None


def skeleton(cfg: TrainConfig, config: ZayaConfig, *, sharded: bool) -> LossModel:
    """The training model and its loss on the meta device: LoRA modules in place (the frozen base in
    the compute dtype, adapters in fp32), activation checkpointing registered, FSDP units made."""
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    spec = lora_spec(cfg)
    if spec is not None:
        apply_lora(model, spec)
        base = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else base)
    if cfg.train.activation_checkpointing:
        for layer in model.model.layers:
            checkpoint(layer)
    root = LossModel(model)
    if sharded:
        fsdp.shard(root, model.model.layers, bf16=cfg.train.precision == "bf16",
                   cpu_offload=cfg.distributed.cpu_offload)
    return root


def adapter_values(cfg: TrainConfig, model: ZayaForCausalLM) -> dict[str, torch.Tensor] | None:
    """The tensors of ``lora.adapter``, checked against the (meta) model before any weight is read:
    trained with the same [lora] settings, for a base of this shape."""
    if not cfg.lora.adapter:
        return None
    return read_adapter_values(Path(cfg.lora.adapter), model, lora_spec(cfg))[1]


def materialise(model: ZayaForCausalLM, device, cfg: TrainConfig, weights: Path | None, *,
                adapters: dict[str, torch.Tensor] | None = None, init: bool = True) -> ZayaForCausalLM:
    """Give the meta model storage on ``device`` and its first values: the base from ``weights`` (a
    checkpoint directory) or drawn from the seed, LoRA adapters from ``adapters`` or as LoRA starts
    them (B = 0). ``init=False`` leaves the storage empty for a sharded training state to fill."""
    model.to_empty(device=device)
    model.tie_weights()
    seed = cfg.train.seed
    if weights is not None:
        load_weights(model, weights)
    elif init:
        model.init_weights(seed, assign=fsdp.assign)
    if init and lora_spec(cfg) is not None:
        init_adapters(model, seed, assign=fsdp.assign)
        for name, value in (adapters or {}).items():
            fsdp.assign(model.get_parameter(name), value)
    return model.train()


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the base model, by its checkpoint name: parameters (tied ones once, adapters
    excluded) and buffers; sharded ones as the rank's DTensors."""
    out = {n: p for n, p in model.named_parameters() if not is_adapter(n)}
    out.update(dict(model.named_buffers()))
    return out


@torch.no_grad()
def load_weights(model: nn.Module, path: Path) -> None:
    """Fill the model from a checkpoint directory, strictly, one tensor (or one shard's rows) at a time."""
    ckpt = open_checkpoint(path)
    targets = base_tensors(model)
    unexpected = sorted(set(ckpt.tensors) - set(targets))
    missing = sorted(set(targets) - set(ckpt.tensors))
    for names, what in ((unexpected, "is not part of this model"), (missing, "is missing from the checkpoint")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{path}: tensor {names[0]} {what}{more}")
    for name, target in targets.items():
        stored = ckpt.shape(name)  # None: assembled from several tensors (legacy experts)
        if stored is not None and stored != tuple(target.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(stored)}, the model needs "
                                  f"{list(target.shape)}")
        rows = fsdp.local_rows(target)
        dest = fsdp.local(target)
        if rows is not None and rows.stop == rows.start:
            continue  # this rank holds no rows of a short tensor
        if stored is not None:
            value = read_aligned(ckpt.origin(name), name, rows)
        else:  # stacked from per-expert tensors: read whole, keep our rows
            value = ckpt.tensors[name]()
            value = value if rows is None else value[rows]
        if tuple(value.shape) != tuple(dest.shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {list(value.shape)}, the model needs "
                                  f"{list(dest.shape)}")
        dest.copy_(value)  # converts to the training dtype (fp32 buffers stay fp32)
