"""Safetensors files: the index of a checkpoint's tensors and the ways of reading them.

* ``SafetensorsFiles`` maps every tensor name to its file (single, sharded with an index, or any
  ``*.safetensors``) and reads tensors through ``safe_open``'s memory map (never unpickled).
* ``read_aligned`` / ``FileRows`` / ``PlainReader`` read with plain file I/O into fresh,
  64-byte-aligned memory: kernels that keep their own copy of a weight (prepacked bf16, repacked
  int4) build it from there, so the mmap'd original is never paged in.
* ``PreadReader`` reads float tensors to be quantized at load with pread(2), so their float pages
  never become resident.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from zaya.errors import CheckpointError
from zaya.quant import QuantSpec, quantize_tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PLAIN_DTYPES = {"I8": torch.int8, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16,
                 "F32": torch.float32, "F8_E4M3": torch.float8_e4m3fn}


class SafetensorsFiles:
    """Index of every tensor in a checkpoint directory: name -> file, opened lazily."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        for file in self._files(path):
            for name in self._open(file).keys():
                if name in self.where:
                    raise CheckpointError(f"tensor {name} appears in both {self.where[name].name} and {file.name}")
                self.where[name] = file

    @staticmethod
    def _files(path: Path) -> list[Path]:
        index = path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
            files = sorted({path / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index.name} lists shard(s) that are missing: {', '.join(missing)}")
            return files
        if (path / SINGLE_FILE).is_file():
            return [path / SINGLE_FILE]
        files = sorted(path.glob("*.safetensors"))
        if not files:
            bins = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {', '.join(bins)}: pickle checkpoints are never loaded; convert them to safetensors)" \
                if bins else ""
            raise CheckpointError(f"no *.safetensors weights in {path}{hint}")
        return files

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as exc:
                raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {exc}"
                                      ) from None
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self.where[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype, read from the header (None: one plain reads do not handle)."""
        return _PLAIN_DTYPES.get(self._open(self.where[name]).get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        try:
            return self._open(file).get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor {name} from {file} (truncated or corrupt?): {exc}") from None


# ------------------------------------------------------------------------------ plain reads
def read_aligned(file, name: str, index: int | slice | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """One tensor of a safetensors file (or with ``index``, its ``[index]`` along the first
    dimension: one position or a step-1 slice) read with plain file I/O into fresh, 64-byte
    aligned memory (or into ``out`` when it has the right shape and dtype: a reused buffer).
    A dtype plain reads do not handle raises KeyError."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))[name]
        begin, end = meta["data_offsets"]
        shape = meta["shape"]
        if index is not None:
            lo, hi, stride = index.indices(shape[0]) if isinstance(index, slice) else (index, index + 1, 1)
            if stride != 1 or not 0 <= lo < hi <= shape[0]:
                raise IndexError(f"{name} has {shape[0]} rows along its first dimension, asked for {index}")
            row = (end - begin) // shape[0]
            begin, end = begin + lo * row, begin + hi * row
            shape = [hi - lo, *shape[1:]] if isinstance(index, slice) else shape[1:]
        dtype = _PLAIN_DTYPES[meta["dtype"]]
        if out is None or list(out.shape) != list(shape) or out.dtype != dtype:
            out = torch.empty(shape, dtype=dtype)
        f.seek(8 + n + begin)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.numel() else memoryview(b"")
        if f.readinto(view) != end - begin:
            raise OSError(f"{file} is truncated in tensor {name}")
    return out


class FileRows:
    """A tensor of a safetensors file, read on demand: ``rows[i:j]`` and ``rows[e]`` (also by
    iterating) read just those rows with plain file I/O. Repacking int4 weights from it never
    holds more than a block of the source in memory."""

    def __init__(self, file, name: str, shape: tuple[int, ...]):
        self.file, self.name, self.shape = file, name, tuple(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        return read_aligned(self.file, self.name, index)

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class PlainReader:
    """What module ``prepare`` methods read their kernel copies from (see zaya.packed, zaya.quant):
    ``tensor(name, index)`` reads a weight (or one expert / a row block of it) into fresh memory,
    ``rows(name)`` gives a ``FileRows``. Both return None when the checkpoint does not hold that
    name (a legacy layout, a tensor quantized at load) or plain reads cannot decode its dtype;
    the module then uses its parameter. ``aliases`` say which names share bytes (a tied head);
    ``at(module_name)`` gives the view a module reads through, with names relative to it."""

    def __init__(self, files: SafetensorsFiles, aliases: dict[str, str] | None = None):
        self.files, self.aliases = files, dict(aliases or {})
        self.buffers: dict[str, torch.Tensor] = {}  # one reusable buffer per expert matrix: no allocation churn
        self.reads = 0  # how many reads made fresh memory (the loader trims the heap after them)

    def at(self, module_name: str) -> ModuleReader:
        return ModuleReader(self, module_name)

    def _file(self, name: str) -> tuple[str, Path | None]:
        name = self.aliases.get(name, name)
        return name, self.files.where.get(name)

    def tensor(self, name: str, index: int | slice | None = None) -> torch.Tensor | None:
        name, file = self._file(name)
        if file is None:
            return None
        kind = name.rsplit(".", 1)[-1] if index is not None else None
        try:
            t = read_aligned(file, name, index, self.buffers.get(kind))
        except KeyError:
            return None
        if kind is not None:
            self.buffers[kind] = t
        self.reads += 1
        return t

    def rows(self, name: str) -> FileRows | None:
        name, file = self._file(name)
        if file is None:
            return None
        self.reads += 1
        return FileRows(file, name, self.files.shape(name))


class ModuleReader:
    """A ``PlainReader`` seen from one module: ``tensor("weight")`` reads ``<module>.weight``."""

    def __init__(self, reader: PlainReader, module_name: str):
        self.reader, self.prefix = reader, module_name + "."

    def tensor(self, name: str, index: int | slice | None = None) -> torch.Tensor | None:
        return self.reader.tensor(self.prefix + name, index)

    def rows(self, name: str) -> FileRows | None:
        return self.reader.rows(self.prefix + name)


PREAD_BLOCK_ELEMENTS = 1 << 24  # large 2-D tensors are quantized in row blocks of about this size


class PreadReader:
    """Reads tensors to be quantized with pread(2) instead of through the mmap, so the float pages
    never become resident: peak memory while quantizing at load is the quantized model plus one
    float tensor (large 2-D tensors go in row blocks)."""

    def __init__(self, files: SafetensorsFiles):
        self.files, self.handles = files, {}

    def _handle(self, file):
        if file not in self.handles:
            try:
                self.handles[file] = safe_open(str(file), framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors without the pread backend
                self.handles[file] = None
        return self.handles[file]

    def quantize(self, name: str, load, spec: QuantSpec, scale_dtype) -> list[torch.Tensor]:
        file = self.files.where.get(name)
        handle = self._handle(file) if file is not None else None
        if handle is None:
            return quantize_tensor(load(), spec, scale_dtype)
        shape = handle.get_slice(name).get_shape()
        if len(shape) != 2 or shape[0] * shape[1] < PREAD_BLOCK_ELEMENTS:
            return quantize_tensor(handle.get_tensor(name), spec, scale_dtype)
        step = max(1, PREAD_BLOCK_ELEMENTS // shape[1])
        # safetensors slices do not clamp at the end: the last block is cut to the rows left
        parts = [quantize_tensor(handle.get_slice(name)[i:min(i + step, shape[0])], spec, scale_dtype)
                 for i in range(0, shape[0], step)]
        return [torch.cat(p) for p in zip(*parts)]


# ------------------------------------------------------------------------------------ memory
def release_free_heap() -> None:
    """Hand the temporaries' freed heap pages back to the OS (glibc keeps them otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
