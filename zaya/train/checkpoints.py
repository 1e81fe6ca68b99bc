"""Crash-safe training checkpoints: the inference format beside a sharded training state.

``OUT/checkpoints/step-0000100/`` holds

* what inference loads: a model directory (config.json, safetensors in the model's dtype,
  tokenizer files) that ``zaya.load`` and transformers read as is, or for a LoRA run the adapter
  in PEFT's format (adapter_config.json, adapter_model.safetensors) beside the tokenizer files;
* ``train_state/``: every rank's shards of the fp32 weights and AdamW moments
  (``zaya.train.state``), which a resumed run loads on any number of ranks;
* ``trainer_state.pt``: the step (which fixes the LR and the data position), the balancing
  controller, RNG states, the config and a fingerprint of the data.

The safetensors are streamed by rank 0 one tensor at a time: each tensor is gathered from the
ranks' shards, written and dropped, so no rank ever holds more than one whole tensor (ZAYA1-8B's
largest, the embedding table, is 1 GB in bf16). Everything goes into ``.tmp-step-...``; after
every file and directory is fsynced, rank 0 renames it to ``step-...``: a directory with that
name is always complete, whatever moment a crash or kill strikes. Older checkpoints are pruned
only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
from pathlib import Path

import torch

from zaya.checkpoint import INDEX_FILE, SINGLE_FILE, tokenizer_files
from zaya.checkpoint.loader import FLOAT32_TENSORS
from zaya.train import fsdp
from zaya.train.state import STATE_DIR, save_state

STATE_FILE = "trainer_state.pt"
MAX_SHARD_BYTES = 5 * 2**30  # the files of an index, as transformers' save_pretrained shards
_NAME = re.compile(r"step-(\d+)")


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and (path / STATE_FILE).is_file() and \
                ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def write_checkpoint(out_dir: Path, step: int, env, model, optimizer, trainer_state: dict, *,
                     weights, tokenizer_dir: Path | None, chat_template: str | None = None, keep: int = 2) -> Path:
    """Write atomically (call on every rank); returns the checkpoint's directory. ``weights(tmp)``
    writes the inference files into the temporary directory (a collective: every rank calls it)."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    env.barrier()
    save_state(tmp / STATE_DIR, model, optimizer)
    weights(tmp)
    env.barrier()
    if env.is_main:
        for f in tokenizer_files(tokenizer_dir) if tokenizer_dir else []:
            shutil.copyfile(f, tmp / f.name)
        if chat_template is not None:  # the template the data was rendered with, so inference matches it
            (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        torch.save(trainer_state, tmp / STATE_FILE)
        _publish(tmp, final, root)
        for _, path in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    env.barrier()
    return final


def _publish(tmp: Path, final: Path, root: Path) -> None:
    for path in sorted(tmp.rglob("*"), reverse=True):  # files, then the directories that hold them
        _fsync(path)
    _fsync(tmp)
    if final.exists():  # the same step written again (e.g. a run restarted with a new config)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)


def write_weights(out: Path, tensors: dict[str, torch.Tensor], dtype: torch.dtype, is_main: bool, *,
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Safetensors of (possibly sharded) tensors, streamed by rank 0 one tensor at a time (every
    rank calls this: gathering a sharded tensor is a collective). Floats are written in ``dtype``,
    except the fp32 selection tensors; past ``max_shard_bytes`` the files get an index."""
    def out_dtype(name, t):
        return t.dtype if not t.is_floating_point() or name.endswith(FLOAT32_TENSORS) else dtype

    files: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * out_dtype(name, t).itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    names = [SINGLE_FILE] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    for fname, group in zip(names, files):
        specs = {n: (tuple(tensors[n].shape), out_dtype(n, tensors[n])) for n in group}
        with _SafetensorsWriter(out / fname, specs) if is_main else contextlib.nullcontext() as writer:
            for n in group:  # converted before the gather: the wire and every rank carry the output dtype
                full = fsdp.full_tensor(tensors[n].detach().to(specs[n][1]))
                if writer is not None:
                    writer.write(full.cpu())
                del full
    if is_main and len(files) > 1:
        total = sum(t.numel() * out_dtype(n, t).itemsize for n, t in tensors.items())
        weight_map = {n: fname for fname, group in zip(names, files) for n in group}
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                 indent=2) + "\n")


class _SafetensorsWriter:
    """A safetensors file written tensor by tensor: the header (every name, dtype, shape and
    offset, known up front) first, then each tensor's bytes in order, so only the tensor being
    written is ever in memory. The format is safetensors' own (8-byte header length, JSON header
    padded to 8 bytes, little-endian data); ``safetensors`` reads the result."""

    DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}

    def __init__(self, path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, (shape, dtype) in specs.items():
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": self.DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")
        self.file.write(len(raw).to_bytes(8, "little") + raw)
        self.order = iter(specs.items())

    def write(self, t: torch.Tensor) -> None:
        name, (shape, dtype) = next(self.order)
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(t.shape)} {t.dtype}, the header says {shape} {dtype}")
        self.file.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def read_trainer_state(path: Path) -> dict:
    # plain tensors, numbers and dicts only: never unpickle arbitrary objects
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def remove_partial(out_dir: Path) -> None:
    """Clean up after a crash during a write: unfinished copies go, a displaced complete one returns."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".old-") and path.is_dir():
            # a crash between the two renames of a rewrite: the old copy is the complete one
            name = path.name[len(".old-"):].rsplit("-", 1)[0]
            if not (root / name).exists():
                os.rename(path, root / name)
                continue
        if path.name.startswith((".tmp-", ".old-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
