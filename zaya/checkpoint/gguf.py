"""A ZAYA GGUF file as the loader reads it (``GGUFCheckpoint``).

The attention projections, the experts and the embedding / LM head (``zaya.quant``'s
``QUANTIZED_MODULES``) stay in their GGUF blocks when their type is one ``zaya.formats`` keeps
(Q8_0, Q6_K, Q5_K, Q5_0, Q4_K, Q4_0): their module classes are ``zaya.formats``' and the bytes are
converted exactly into ``zaya.kernels`` layouts, read from the file with pread so the memory map is
never paged in. F32 / F16 / BF16 tensors load as floats in the model's dtype, and the small
remaining tensors (router, convs, norms, scales) of any type gguf-py can dequantize are
dequantized by gguf-py at load. The config comes from the file's metadata and tensor shapes
(``gguf_names``); the tokenizer and chat template from its vocabulary (``gguf_vocab``).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from zaya import formats
from zaya.checkpoint.gguf_names import config_dict, expected_names, native_name, UNSQUEEZE_1
from zaya.config import ZayaConfig
from zaya.errors import CheckpointError, ConfigError
from zaya.quant import QUANTIZED_MODULES

FLOAT_TYPES = ("F32", "F16", "BF16")


def _gguf():
    import gguf  # imported on use: only GGUF files need it

    return gguf


def read_gguf(path: Path):
    """gguf-py's reader over ``path``, with its failures (a truncated file, an unknown tensor
    type, a file that is no GGUF) turned into one-line errors naming the file."""
    try:
        return _gguf().GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "not a valid" in first.lower() or "is not a valid GGMLQuantizationType" in first:
            raise CheckpointError(f"{path}: unknown tensor type ({first})") from None
        raise CheckpointError(f"{path} is not a readable GGUF file (truncated or corrupt?): {first}") from None


class GGUFInfo:
    """What ``model.config.quantization`` says about a GGUF model: its tensor types, with the
    number of tensors and bytes of each."""

    bits = None

    def __init__(self, types: dict[str, int], nbytes: dict[str, int]):
        self.types, self.nbytes = types, nbytes

    def to_config(self) -> dict:
        return {"method": "gguf", "types": dict(sorted(self.types.items())), "bytes": dict(sorted(self.nbytes.items()))}

    def __str__(self) -> str:
        return "GGUF: " + ", ".join(f"{t} {n} tensors {self.nbytes[t] / 1e6:.1f} MB"
                                    for t, n in sorted(self.types.items(), key=lambda kv: -self.nbytes[kv[0]]))


class GGUFCheckpoint:
    """The members ``zaya.checkpoint.loader`` reads, for one ``.gguf`` file of architecture ``zaya``."""

    layout = "gguf"

    def __init__(self, path: Path):
        self.path = Path(path)
        self.reader_ = read_gguf(self.path)
        fields = self.reader_.fields
        arch = fields.get("general.architecture")
        arch = arch.contents() if arch is not None else None
        if arch != "zaya":
            raise CheckpointError(f"{self.path}: architecture {arch!r}, expected 'zaya' (a ZAYA GGUF file)")
        self.by_name = {t.name: t for t in self.reader_.tensors}
        shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in self.by_name.items()}  # torch order
        try:
            self.config = ZayaConfig.from_dict(config_dict(fields, shapes, self.path.name))
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        half = self.config.num_hidden_layers * 2
        native = {n: native_name(n, half) for n in self.by_name}
        self._expected = {native_name(n, half): n for n in expected_names(half, self.config.tie_word_embeddings)}
        self.codecs = self._codecs(native)
        self.stored = GGUFInfo(*self._type_counts())
        self.tensors: dict[str, Callable[[], torch.Tensor]] = {}
        self.sources: dict[str, str] = {}  # the loader's tensor name -> the GGUF name
        for n, name in native.items():
            key = self._store_key(name)
            name = name if key is None else f"{key}.data"
            self.sources[name] = n
            self.tensors[name] = (lambda n=n: self._raw(n)) if key is not None else (lambda n=n: self._float(n))

    # -- what stays compressed ----------------------------------------------------------------------
    def _store_key(self, native: str) -> str | None:
        """The codec (and module) key of a tensor that stays compressed, else None."""
        if native in self.codecs:  # an expert stack
            return native
        module, leaf = native.rsplit(".", 1)
        return module if leaf == "weight" and module in self.codecs else None

    def _codecs(self, native: dict[str, str]) -> dict[str, formats.Codec]:
        codecs = {}
        for n, name in native.items():
            module, leaf = name.rsplit(".", 1)
            t = self.by_name[n]
            kind = t.tensor_type.name
            if leaf not in ("weight", "gate_up_proj", "down_proj") or not QUANTIZED_MODULES.fullmatch(module) \
                    or kind in FLOAT_TYPES:
                continue
            if kind not in formats.GGUF_KEPT:
                raise CheckpointError(f"{self.path.name}: tensor {n} has type {kind}, which zaya does not load "
                                      f"(supported: {', '.join(FLOAT_TYPES + tuple(sorted(formats.GGUF_KEPT)))})")
            dims = [int(d) for d in reversed(t.shape)]  # torch order: [E?, N, K]
            codecs[module if leaf == "weight" else name] = formats.Codec(
                kind, dims[-2], dims[-1], dims[0] if len(dims) == 3 else None)
        for name in [c for c in codecs if c.endswith(".gate_up_proj")] + [c for c in codecs if c.endswith(".down_proj")]:
            pair = name.rsplit(".", 1)[0] + (".down_proj" if name.endswith(".gate_up_proj") else ".gate_up_proj")
            if pair in codecs:
                continue
            if pair not in native.values():
                raise CheckpointError(f"tensor {self._expected.get(pair, pair)} is missing from the checkpoint in "
                                      f"{self.path}")
            raise CheckpointError(f"{self.path.name}: the experts {name} and {pair} mix a quantized and a float "
                                  "type; zaya keeps both quantized or both float")
        return codecs

    def _type_counts(self) -> tuple[dict[str, int], dict[str, int]]:
        counts: dict[str, int] = {}
        nbytes: dict[str, int] = {}
        for t in self.by_name.values():
            kind = t.tensor_type.name
            counts[kind] = counts.get(kind, 0) + 1
            nbytes[kind] = nbytes.get(kind, 0) + int(t.n_bytes)
        return counts, nbytes

    def _raw(self, n: str) -> torch.Tensor:
        with warnings.catch_warnings():  # the memory map is read-only, and stays untouched
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(self.by_name[n].data)

    def _float(self, n: str) -> torch.Tensor:
        t = self.by_name[n]
        kind = t.tensor_type.name
        data = np.array(t.data)  # a copy: the memory map is read-only
        if kind == "BF16":
            out = torch.from_numpy(data).view(torch.bfloat16)
        elif kind in ("F32", "F16"):
            out = torch.from_numpy(data)
        else:
            try:
                out = torch.from_numpy(_gguf().quants.dequantize(data, t.tensor_type))
            except NotImplementedError:
                raise CheckpointError(f"{self.path.name}: tensor {n} has type {kind}, which gguf-py cannot "
                                      "dequantize") from None
        if n.endswith(UNSQUEEZE_1):
            out = out.unsqueeze(1)
        return out

    # -- the loader's members ----------------------------------------------------------------------
    def origin(self, name: str) -> Path:
        return self.path

    def source_name(self, name: str) -> str:
        """The GGUF name of one of the loader's tensor names (for messages)."""
        return self.sources.get(name) or self._expected.get(name) or name

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name.endswith(".data"):
            return self.codecs[name[: -len(".data")]].data_shape
        t = self.by_name[self.sources[name]]
        dims = tuple(int(d) for d in reversed(t.shape))
        return dims[:1] + (1,) + dims[1:] if t.name.endswith(UNSQUEEZE_1) else dims

    def swap_modules(self, model) -> None:
        formats.swap_modules(model, self.codecs)

    def stored_quantized(self, name: str, t: torch.Tensor, device) -> torch.Tensor | None:
        return t if name.endswith(".data") and name.rsplit(".", 1)[0] in self.codecs else None

    def quantize(self, name, load, spec, dtype):
        raise CheckpointError(f"{self.path} is already quantized; it cannot be quantized again at load")

    def reader(self) -> "GGUFReads":
        return GGUFReads(self.path, {name: self.by_name[n] for name, n in self.sources.items() if name.endswith(".data")})


class GGUFReads:
    """Plain reads (pread into fresh memory) of the stored matrices, for ``StoredMatrix.prepare``:
    ``at(module).tensor("data", index)`` reads the module's bytes, or expert ``index`` of them."""

    def __init__(self, path: Path, tensors: dict):
        self.path, self.tensors = path, tensors
        self.reads = 0
        self.buffer: torch.Tensor | None = None

    def at(self, module_name: str) -> "_ModuleReads":
        return _ModuleReads(self, module_name + ".")

    def tensor(self, name: str, index: int | slice | None = None) -> torch.Tensor | None:
        """Tensor ``name``, or its ``[index]`` along the first dimension (a position or a step-1
        slice), read into fresh memory (a position: into a buffer reused by the next read)."""
        t = self.tensors.get(name)
        if t is None:
            return None
        shape = tuple(int(d) for d in t.data.shape)
        offset, size = int(t.data_offset), int(t.n_bytes)
        if index is not None:
            lo, hi, _ = index.indices(shape[0]) if isinstance(index, slice) else (index, index + 1, 1)
            row = size // shape[0]
            offset, size = offset + lo * row, (hi - lo) * row
            shape = (hi - lo, *shape[1:]) if isinstance(index, slice) else shape[1:]
        if isinstance(index, int):
            if self.buffer is None or self.buffer.numel() < size:
                self.buffer = torch.empty(size, dtype=torch.uint8)
            out = self.buffer[:size]
        else:
            out = torch.empty(size, dtype=torch.uint8)
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [memoryview(out.numpy())], offset)
        if got != size:
            raise CheckpointError(f"{self.path} is truncated in tensor {t.name}")
        self.reads += 1
        return out.view(shape)


class _ModuleReads:
    def __init__(self, reads: GGUFReads, prefix: str):
        self.reads, self.prefix = reads, prefix

    def tensor(self, name: str, index: int | slice | None = None) -> torch.Tensor | None:
        return self.reads.tensor(self.prefix + name, index)
