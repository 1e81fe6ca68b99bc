"""Loading a checkpoint: one pipeline of named steps, the same for every on-disk format.

    open (config, tensor index) -> build on meta -> choose module classes -> assign weights
    -> prepare kernels

A LoRA adapter (``adapter=DIR``, PEFT's format) is checked against the model right after it is
built, its modules go in before the device's module classes are chosen (so adapted projections
and experts are neither packed nor quantized), and its tensors are assigned after the base's:
the adapter is served unmerged, the base weights stay as the file has them.

Loading is strict and lazy: tensors are memory-mapped (never unpickled), every expected tensor
must be present exactly once with the right shape, and anything unexpected is an error that
names the tensor and the file it came from.

What the pipeline reads from a format (``SafetensorsCheckpoint``, ``CompressedTensorsCheckpoint``,
``GGUFCheckpoint``): ``path``, ``config``,
``layout``, ``tensors`` (native name -> loader), ``origin(name)``, ``shape(name)``, ``stored`` (None
or the quantization its stored tensors carry: ``bits``, ``to_config()``, ``str()``), optionally
``source_name(name)`` (the name a tensor has in the file, for messages), ``swap_modules(model)`` (the
classes the stored tensors need), ``stored_quantized(name, t, device)``, ``quantize(name, load,
spec, dtype)`` and ``reader()`` (plain reads for the kernels' own copies). Which module classes
serve the device (prepacked bf16, a CPU decode-attention kernel) is chosen here, from the dtype
and device alone. Modules with a ``prepare(name, dtype, reader)`` method build their kernel
layouts in the last step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from zaya import cpu_attention, fused, lora, packed, quant
from zaya.checkpoint.adapters import adapter_values
from zaya.checkpoint import compressed
from zaya.checkpoint.directory import SafetensorsCheckpoint
from zaya.checkpoint.gguf import GGUFCheckpoint
from zaya.checkpoint.files import release_free_heap
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError
from zaya.model import ZayaForCausalLM

FLOAT32_TENSORS = ("balancing_biases",)  # selection arithmetic is fp32 in the reference


def open_checkpoint(path: Path):
    """The format reader for ``path``: a ``.gguf`` file, or a directory with config.json and
    safetensors (compressed-tensors when config.json's ``quantization_config`` says so)."""
    path = Path(path)
    if path.is_file():
        return GGUFCheckpoint(path)  # GGUFCheckpoint says so when the file is no GGUF
    if compressed.is_compressed_tensors(path):
        return compressed.CompressedTensorsCheckpoint(path)
    return SafetensorsCheckpoint(path)


def load_model(path: Path, *, dtype: torch.dtype | None = None, device=None, quantize: str | None = None,
               adapter: Path | None = None) -> tuple[ZayaForCausalLM, ZayaConfig, str]:
    """Build the model on the meta device and assign the checkpoint's tensors to it, strictly.

    A checkpoint written by ``zaya quantize`` (a ``quantization`` section in config.json) loads
    its quantized tensors directly; ``quantize`` quantizes a float checkpoint while loading;
    ``adapter`` applies a LoRA adapter unmerged."""
    ckpt = open_checkpoint(path)
    spec = quantize_at_load(ckpt, quantize)
    dtype = dtype or getattr(torch, ckpt.config.dtype)
    device = torch.device(device or "cpu")
    model = build(ckpt)
    expected = expected_tensors(ckpt, model)
    if adapter is not None and (spec or ckpt.stored):
        raise CheckpointError(f"a LoRA adapter is applied to float weights; {ckpt.path} would be quantized. Merge it "
                              "first (zaya export --merge-lora), then quantize the merged checkpoint")
    adapters = adapter_values(adapter, model) if adapter is not None else None
    if adapters is not None:
        lora.apply_lora(model, adapters[0])
    choose_modules(model, spec, dtype, device)
    assign_weights(model, read_weights(ckpt, expected, spec, dtype, device))
    if adapters is not None:
        lora.assign_adapters(model, adapters[1])
    prepare_kernels(model, dtype, ckpt.reader())
    fused.install(model)
    quantization = ckpt.stored or spec
    if quantization is not None:
        model.config = dataclasses.replace(ckpt.config, quantization=quantization.to_config())
        model.model.config = model.config
    return model, model.config, ckpt.layout


def quantize_at_load(ckpt, quantize) -> quant.QuantSpec | None:
    """The quantization to apply while loading (None for an already-quantized checkpoint)."""
    wanted = quant.QuantSpec.parse(quantize)
    stored = ckpt.stored
    if stored is not None and wanted is not None and stored.bits != wanted.bits:
        label = f"int{stored.bits}" if stored.bits else str(stored)
        raise CheckpointError(f"{ckpt.path} is already quantized ({label}); it cannot be loaded as "
                              f"int{wanted.bits} (quantize the float checkpoint instead)")
    return None if stored is not None else wanted


def build(ckpt) -> ZayaForCausalLM:
    """The model on the meta device, with the module classes its stored tensors need."""
    with torch.device("meta"):
        model = ZayaForCausalLM(ckpt.config)
    ckpt.swap_modules(model)
    return model


def expected_tensors(ckpt, model) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint must hold; a missing or unexpected one is an error."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if ckpt.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    source = getattr(ckpt, "source_name", lambda n: n)
    unexpected = sorted(set(ckpt.tensors) - set(expected))
    if unexpected:
        n, where = unexpected[0], ckpt.origin(unexpected[0])
        n = source(n)
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        hint = " (config says tie_word_embeddings=true)" if n == "lm_head.weight" else ""
        raise CheckpointError(f"unexpected tensor {n}{' in ' + where.name if where else ''}{hint}{more}: "
                              "it does not belong to this config")
    missing = sorted(set(expected) - set(ckpt.tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {source(missing[0])} is missing from the checkpoint in {ckpt.path}{more}")
    return expected


def choose_modules(model, spec: quant.QuantSpec | None, dtype: torch.dtype, device: torch.device) -> None:
    """Module classes for quantizing at load and for the device's fast paths (on meta, before
    any weight is read). Quantized modules are chosen first: packing takes the float ones left."""
    if spec is not None:
        quant.swap_modules(model, spec)
    if packed.available(dtype, device):
        packed.swap_modules(model)
    if cpu_attention.available(dtype, device):
        cpu_attention.swap_modules(model)


def read_weights(ckpt, expected, spec, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Every tensor read, checked, cast to the load dtype and placed (quantized when ``spec`` asks)."""
    state = {}
    for name, load in ckpt.tensors.items():
        shape = ckpt.shape(name)
        if shape is not None and shape != expected[name]:
            shown = getattr(ckpt, "source_name", lambda n: n)(name)
            raise CheckpointError(f"tensor {shown} in {ckpt.origin(name).name} has shape {list(shape)}, expected "
                                  f"{list(expected[name])} from the config")
        if spec is not None and quant.is_target(name):
            state.update({k: t.to(device=device) for k, t in ckpt.quantize(name, load, spec, dtype).items()})
        else:
            state[name] = _placed(ckpt, name, load(), expected[name], dtype, device)
    return state


def _placed(ckpt, name: str, t: torch.Tensor, shape, dtype, device) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise CheckpointError(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    stored = ckpt.stored_quantized(name, t, device)
    if stored is not None:
        return stored
    if not t.is_floating_point():
        raise CheckpointError(f"tensor {name} in {ckpt.origin(name) or ckpt.path} has dtype {t.dtype}, "
                              "expected floats")
    return t.to(device=device, dtype=torch.float32 if name.endswith(FLOAT32_TENSORS) else dtype)


def assign_weights(model, state: dict[str, torch.Tensor]) -> None:
    model.load_state_dict(state, strict=False, assign=True)  # completeness was checked by expected_tensors
    model.tie_weights()
    model.eval()


def prepare_kernels(model, dtype: torch.dtype, reader) -> None:
    """Let every module with kernel layouts of its own (quantized, prepacked) build them, then hand
    the freed temporaries back to the OS after each one that read from the files."""
    for name, module in model.named_modules():
        prepare = getattr(module, "prepare", None)
        if prepare is None:
            continue
        reads = reader.reads
        prepare(dtype, reader.at(name))
        if reader.reads != reads:
            release_free_heap()
    release_free_heap()
