"""Writing checkpoints: config.json plus safetensors in the native layout (sharded past a size),
with the tokenizer files copied along; ``convert`` and ``save_quantized`` load strictly first, so
a broken source never produces a half-written output; ``merge_adapter`` folds a LoRA adapter
into a base checkpoint file by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zaya import lora
from zaya.checkpoint.adapters import adapter_values
from zaya.checkpoint.files import INDEX_FILE, SINGLE_FILE
from zaya.checkpoint.hub import resolve
from zaya.checkpoint.layouts import read_config
from zaya.checkpoint.loader import load_model, open_checkpoint
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError
from zaya.model import ZayaForCausalLM
from zaya.quant import QuantSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def state_for_saving(model: ZayaForCausalLM) -> dict[str, torch.Tensor]:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save(state: dict[str, torch.Tensor], config: ZayaConfig | dict, out: Path, *,
         max_shard_bytes: int | None = None, extra_files: list[Path] = ()) -> None:
    """Write config.json and safetensors (sharded with an index past ``max_shard_bytes``)."""
    out.mkdir(parents=True, exist_ok=True)
    raw = config.to_dict() if isinstance(config, ZayaConfig) else config
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    for f in extra_files:
        if Path(f).is_file():
            (out / Path(f).name).write_bytes(Path(f).read_bytes())


def tokenizer_files(path: Path) -> list[Path]:
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]


def convert(src: Path, dst: Path) -> str:
    """Rewrite a checkpoint (legacy or native) in the native layout; returns the source layout."""
    src = resolve(src)
    config, _ = read_config(src)
    model, config, layout = load_model(src, dtype=getattr(torch, config.dtype))
    save(state_for_saving(model), config, Path(dst), extra_files=tokenizer_files(src))
    return layout


def save_quantized(src, dst, spec: QuantSpec, dtype: torch.dtype | None = None) -> dict:
    """Quantize a float checkpoint into ``dst`` (safetensors + config.json with a quantization section)."""
    src = resolve(src)
    model, config, _ = load_model(src, dtype=dtype, quantize=spec)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save(state, config, Path(dst), extra_files=tokenizer_files(src))
    return {"tensors": len(state), "bytes": sum(t.numel() * t.element_size() for t in state.values())}


def merge_adapter(base: Path, adapter: Path, out: Path) -> Path:
    """Write ``base`` + ``adapter`` as a plain checkpoint in ``out``, one safetensors file of the
    base at a time (the model is never whole in memory), keeping the base's files, names, dtypes
    and tokenizer files. Written into a temporary directory and renamed when complete."""
    base, adapter, out = Path(base), Path(adapter), Path(out)
    ckpt = open_checkpoint(base)
    if ckpt.layout != "native":
        raise CheckpointError(f"{base} is in the legacy layout; convert it first (zaya convert)")
    if ckpt.stored is not None:
        raise CheckpointError(f"{base} is quantized; merge into the float checkpoint")
    with torch.device("meta"):
        skeleton = ZayaForCausalLM(ckpt.config)
    spec, values = adapter_values(adapter, skeleton)
    deltas = lora.weight_deltas(skeleton, spec, values)
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for file in sorted(set(ckpt.files.where.values())):
        with safe_open(str(file), framework="pt") as f:
            part = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        for name in set(part) & set(deltas):
            part[name] = (part[name].float() + deltas.pop(name)()).to(part[name].dtype)
        save_file(part, str(tmp / file.name), metadata=meta)
    if deltas:
        raise CheckpointError(f"{base} holds no tensor {next(iter(deltas))}, which the adapter changes")
    for extra in [base / "config.json", base / INDEX_FILE, *tokenizer_files(base)]:
        if extra.is_file():
            shutil.copyfile(extra, tmp / extra.name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
