"""LoRA adapter files in PEFT's format (``adapter_config.json`` + ``adapter_model.safetensors``):
reading, writing, and applying one to a model (``zaya.checkpoint.writer.merge_adapter`` merges one
into a base checkpoint).

The modules and the name mapping are ``zaya.lora``'s; this module only moves bytes. The base
model's shape is recorded in the safetensors metadata (``zaya_base_shape``), so an adapter meets
a base of another shape with an error instead of wrong numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from zaya import lora
from zaya.errors import CheckpointError

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def is_adapter_dir(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def save_adapter(out: Path, state: dict[str, torch.Tensor], spec: lora.LoraSpec, model: nn.Module,
                 base: str | None = None) -> None:
    """Write the adapter tensors ``state`` (zaya's names, see ``lora.adapter_names``) of ``model``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(lora.peft_config(spec, model, base), indent=2) + "\n")
    meta = {"format": "pt", "zaya_base_shape": json.dumps(lora.base_shape(model.config))}
    tensors = {k: v.detach().cpu() for k, v in lora.to_peft(state, model, spec).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata=meta)


def read_adapter(path: Path) -> tuple[lora.LoraSpec, dict, dict[str, torch.Tensor]]:
    """(spec, adapter_config.json with the recorded base shape, PEFT-named tensors)."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file() or not weights.is_file():
        raise CheckpointError(f"{path} is not a LoRA adapter directory (it needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from None
    spec = lora.spec_from_peft(raw, cfg_file)
    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {exc}") from None
    if "zaya_base_shape" in meta:
        raw["zaya_base_shape"] = json.loads(meta["zaya_base_shape"])
    return spec, raw, tensors


def adapter_values(path: Path, model: nn.Module, spec: lora.LoraSpec | None = None
                   ) -> tuple[lora.LoraSpec, dict[str, torch.Tensor]]:
    """The adapter's spec and its tensors under zaya's names for ``model`` (with or without the
    adapter modules in place), checked against it: the recorded base shape, every tensor's shape.
    ``spec``, when given, must be the adapter's own (a run continuing an adapter)."""
    path = Path(path)
    found, raw, tensors = read_adapter(path)
    if spec is not None and (found.r, found.alpha, set(found.expanded())) != (spec.r, spec.alpha,
                                                                             set(spec.expanded())):
        raise CheckpointError(f"{path} has r={found.r}, alpha={found.alpha}, targets {list(found.targets)}; "
                              f"expected r={spec.r}, alpha={spec.alpha}, targets {list(spec.targets)}")
    lora.check_base(raw, model.config, path)
    return found, lora.from_peft(tensors, model, found, path)


@torch.no_grad()
def load_adapter(model: nn.Module, path: Path) -> lora.LoraSpec:
    """Apply the adapter in ``path`` to ``model``, unmerged; its tensors take the base weights' dtype
    and device. Everything is checked before the model is changed."""
    spec, values = adapter_values(path, model)
    lora.apply_lora(model, spec)
    lora.assign_adapters(model, values)
    return spec
