"""compressed-tensors checkpoints (``quantization_config.quant_method == "compressed-tensors"``),
such as Zyphra's ``ZAYA1-8B-FP8-Experts`` and ``ZAYA1-8B-MXFP4-Experts``.

What is read, per quantized weight (the names compressed-tensors gives a module's weight, with
ZAYA's stacked experts treated as one module per stack, ``<layer>.mlp.experts.gate_up_proj``):

* values: ``X.weight`` (an ``nn.Linear``), ``X`` itself (an expert stack) or ``X.weight_packed``;
* ``X.weight_scale``; ``X.weight_shape`` is accepted (the values' own shape is checked).

Formats: ``float-quantized`` / ``naive-quantized`` FP8 e4m3 weights (scale per tensor, per output
channel, or per ``block_structure`` block) and ``mxfp4-pack-quantized`` (e2m1 pairs, one e8m0 scale
per 32). Both stay compressed (``zaya.formats``). Dynamic activation quantization in the config is
not applied: activations stay in the model dtype, which is at least as precise. Anything else
(int formats, NVFP4's global scales, zero points, static activation scales, transforms) is refused
with the file and tensor named. ``ignore`` and ``targets`` (class names or ``re:`` patterns on module
names; "Linear" also matches expert stacks) must agree with the tensors that carry a scale.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from zaya import formats
from zaya.checkpoint.directory import SafetensorsCheckpoint
from zaya.checkpoint.files import PlainReader
from zaya.errors import CheckpointError

FP8_FORMATS = ("float-quantized", "naive-quantized")
MXFP4_FORMAT = "mxfp4-pack-quantized"
VALUE_SUFFIXES = (".weight", "", ".weight_packed")
UNREAD = {".weight_packed": "packed values without a weight_scale beside them",
          ".weight_shape": "a weight_shape without a weight_scale beside it",
          ".weight_zero_point": "zero points (asymmetric quantization) are not supported",
          ".weight_global_scale": "global scales (NVFP4) are not supported",
          ".input_scale": "static activation scales are not supported"}


def quantization_config(path: Path) -> dict | None:
    try:
        raw = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    q = raw.get("quantization_config") if isinstance(raw, dict) else None
    return q if isinstance(q, dict) else None


def is_compressed_tensors(path: Path) -> bool:
    q = quantization_config(path) if Path(path).is_dir() else None
    return q is not None and q.get("quant_method") == "compressed-tensors"


def _matches(patterns, name: str, kind: str) -> bool:
    for p in patterns or []:
        if p.startswith("re:") and re.match(p[3:], name):
            return True
        if p == name or p == kind:
            return True
    return False


class CompressedTensorsInfo:
    bits = None

    def __init__(self, fmt: str, count: int):
        self.format, self.count = fmt, count

    def to_config(self) -> dict:
        return {"method": "compressed-tensors", "format": self.format, "quantized_tensors": self.count}

    def __str__(self) -> str:
        return f"compressed-tensors {self.format}"


class CompressedTensorsCheckpoint(SafetensorsCheckpoint):
    """A safetensors directory whose quantized weights stay compressed (``zaya.formats``)."""

    def __init__(self, path: Path):
        super().__init__(path)
        if self.layout != "native":
            raise CheckpointError(f"{path}: compressed-tensors checkpoints are read in the native layout only")
        self.qconfig = quantization_config(self.path)
        self._check_config()
        self.file_names: dict[str, str] = {}  # the loader's name -> the file's tensor name
        self.codecs: dict[str, formats.Codec] = {}
        for scale in sorted(n for n in self.tensors if n.endswith(".weight_scale")):
            self._add(scale[: -len(".weight_scale")])
        for leftover in sorted(n for n in self.tensors if n.endswith(tuple(UNREAD))):
            self._refuse(leftover, UNREAD["." + leftover.rsplit(".", 1)[1]])
        self.stored = CompressedTensorsInfo(self.qconfig.get("format", "?"), len(self.codecs))

    def _refuse(self, name: str, why: str):
        raise CheckpointError(f"tensor {name} in {self.files.where[name].name}: {why}")

    def _check_config(self) -> None:
        q = self.qconfig
        if q.get("transform_config") or q.get("kv_cache_scheme"):
            raise CheckpointError(f"{self.path}/config.json: compressed-tensors transforms and KV-cache schemes "
                                  "are not supported")
        for name, group in (q.get("config_groups") or {}).items():
            fmt = group.get("format") or q.get("format")
            if fmt not in FP8_FORMATS + (MXFP4_FORMAT,):
                raise CheckpointError(f"{self.path}/config.json: config group {name} has format {fmt!r}; zaya reads "
                                      f"{', '.join(FP8_FORMATS + (MXFP4_FORMAT,))}")
            acts = group.get("input_activations")
            if acts and not acts.get("dynamic"):
                raise CheckpointError(f"{self.path}/config.json: config group {name} has static activation scales, "
                                      "which zaya does not apply")

    def _group(self, module: str, kind: str) -> dict:
        q = self.qconfig
        if _matches(q.get("ignore"), module, kind):
            self._refuse(module + ".weight_scale", "quantized although config.json's ignore list names it")
        for group in (q.get("config_groups") or {}).values():
            if _matches(group.get("targets"), module, kind):
                return group
        self._refuse(module + ".weight_scale", "no config group of config.json targets it")

    def _add(self, key: str) -> None:
        values = next((key + s for s in VALUE_SUFFIXES if key + s in self.tensors), None)
        scale = key + ".weight_scale"
        if values is None:
            self._refuse(scale, f"no quantized values beside it ({', '.join(key + s for s in VALUE_SUFFIXES)})")
        experts = key.endswith((".experts.gate_up_proj", ".experts.down_proj"))
        group = self._group(key, "Linear")
        codec = self._codec(key, group, self.files.shape(values), self.files.shape(scale), experts)
        self.codecs[key] = codec
        self.file_names[f"{key}.data"], self.file_names[f"{key}.scale"] = values, scale
        for file_name in (values, scale, key + ".weight_shape"):
            self.tensors.pop(file_name, None)
        self.tensors[f"{key}.data"] = lambda n=values: self.files.get(n)
        self.tensors[f"{key}.scale"] = lambda n=scale: self.files.get(n)

    def _codec(self, key: str, group: dict, values: tuple, scale: tuple, experts: bool) -> formats.Codec:
        w = group.get("weights") or {}
        fmt = group.get("format") or self.qconfig.get("format")
        lead = values[:1] if experts else ()
        n = values[-2]
        scale_dtype = self.files.dtype(key + ".weight_scale")
        if fmt == MXFP4_FORMAT:
            if w.get("num_bits") != 4 or w.get("type") != "float" or w.get("group_size") != 32:
                self._refuse(key + ".weight_scale", f"format {fmt} with weights {w} is not MXFP4")
            return formats.Codec("mxfp4", n, values[-1] * 2, lead[0] if lead else None, scale[len(lead):],
                                 scale_dtype)
        if w.get("num_bits") != 8 or w.get("type") != "float":
            self._refuse(key + ".weight_scale", f"format {fmt} with weights {w} is not FP8 e4m3")
        strategy, block = w.get("strategy"), None
        if strategy == "block":
            bn, bk = w.get("block_structure") or (0, 0)
            block = (int(bn), int(bk))
        elif strategy not in ("tensor", "channel"):
            self._refuse(key + ".weight_scale", f"FP8 strategy {strategy!r} is not supported "
                                                "(tensor, channel, block)")
        return formats.Codec("fp8", n, values[-1], lead[0] if lead else None, scale[len(lead):], scale_dtype, block)

    # -- the loader's members ----------------------------------------------------------------------
    def origin(self, name: str) -> Path | None:
        return self.files.where.get(self.file_names.get(name, name))

    def source_name(self, name: str) -> str:
        return self.file_names.get(name, name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        file_name = self.file_names.get(name, name)
        return self.files.shape(file_name) if file_name in self.files.where else None

    def swap_modules(self, model) -> None:
        formats.swap_modules(model, self.codecs)

    def stored_quantized(self, name: str, t: torch.Tensor, device) -> torch.Tensor | None:
        if name not in self.file_names:
            return None
        codec = self.codecs[name.rsplit(".", 1)[0]]
        want = codec.data_dtype if name.endswith(".data") else codec.scale_dtype
        if t.dtype != want:
            self._refuse(self.file_names[name], f"dtype {t.dtype}, expected {want} for {codec.kind}")
        return t.to(device=device)

    def reader(self) -> PlainReader:
        return PlainReader(self.files, dict(self.file_names))
