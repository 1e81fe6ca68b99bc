"""A checkpoint directory: config.json plus safetensors, native or legacy layout, float or quantized
by ``zaya quantize``.

``SafetensorsCheckpoint`` is what the loader reads a checkpoint through (``zaya.checkpoint.loader``
names the members it uses). Another on-disk format (GGUF, compressed-tensors) is another class with
the same members: its config, its tensors under native names, and the module classes its stored
tensors need.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from zaya import quant
from zaya.checkpoint.files import PlainReader, PreadReader, SafetensorsFiles, read_aligned
from zaya.checkpoint.layouts import detect_layout, native_tensors, read_config
from zaya.errors import CheckpointError


class SafetensorsCheckpoint:
    """config.json and the tensor index of a directory, checked against each other."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.config, config_layout = read_config(self.path)
        self.files = SafetensorsFiles(self.path)
        self.layout = detect_layout(self.files.where)
        if self.layout != config_layout:
            raise CheckpointError(f"{path}: config.json describes a {config_layout} checkpoint but the tensors are "
                                  f"in the {self.layout} layout")
        self.stored = quant.QuantSpec.parse(self.config.quantization)  # None: float tensors
        self.tensors: dict[str, Callable[[], torch.Tensor]] = native_tensors(self.files, self.config)
        self._pread: PreadReader | None = None

    def origin(self, name: str) -> Path | None:
        """The file a native name is stored in, for messages (None: assembled from several)."""
        return self.files.where.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        """The stored shape, read from the header without loading (None: assembled from several)."""
        return self.files.shape(name) if name in self.files.where else None

    def swap_modules(self, model) -> None:
        """Give ``model`` (on the meta device) the module classes the stored tensors need."""
        if self.stored is not None:
            quant.swap_modules(model, self.stored)

    def stored_quantized(self, name: str, t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """A stored quantized weight, checked and placed; None when ``name`` is not one."""
        if self.stored is None or not name.endswith(".qweight"):
            return None
        bits = self.stored.bits
        want = torch.int8 if bits == 8 else torch.uint8
        if t.dtype != want:
            raise CheckpointError(f"tensor {name} has dtype {t.dtype}, expected {want} (int{bits})")
        if bits == 8 and device.type == "cpu" and not quant.uses_kernels(device):
            t = read_aligned(self.files.where[name], name)  # used as-is by PyTorch's kernel: aligned, not mmap'd
        return t.to(device=device)

    def quantize(self, name: str, load: Callable[[], torch.Tensor], spec: quant.QuantSpec,
                 scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A float tensor quantized while loading: ``{X.qweight, X.scales(, X.zeros)}``."""
        if self._pread is None:
            self._pread = PreadReader(self.files)
        parts = self._pread.quantize(name, load, spec, scale_dtype)
        return dict(zip(quant.quantized_names(name, spec), parts))

    def reader(self) -> PlainReader:
        """Plain reads for the modules' kernel copies; a tied head reads the embedding's bytes."""
        tied = {}
        if self.config.tie_word_embeddings:
            tied = {f"lm_head.{leaf}": f"model.embed_tokens.{leaf}" for leaf in ("weight", "qweight")}
        return PlainReader(self.files, tied)
