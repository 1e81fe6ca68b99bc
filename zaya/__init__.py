"""zaya: run, serve, test-time-scale and train ZAYA1 models on stock PyTorch."""

from __future__ import annotations

from pathlib import Path

import torch

from zaya.engine import LLM, Completion, TokenEvent
from zaya.errors import CheckpointError, ConfigError, ContextLengthError, ZayaError

__version__ = "0.1.0"
__all__ = ["load", "LLM", "Completion", "TokenEvent", "ZayaError", "CheckpointError", "ConfigError",
           "ContextLengthError", "DEFAULT_MODEL"]

DEFAULT_MODEL = Path(__file__).parent / "assets" / "zaya-tiny"

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ZayaError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load(model: str | Path | None = None, *, dtype=None, device=None, quantize: str | None = None,
         max_context: int | None = None) -> LLM:
    """Load a ZAYA checkpoint (a local directory or a hub repo id) as an `LLM`.

    With no ``model``, the small built-in model that ships with zaya is loaded (no download).
    ``dtype`` defaults to the checkpoint's; ``quantize`` is ``"int8"`` or ``"int4"`` (weight-only).
    """
    from zaya.checkpoint import load_model, resolve
    from zaya.tokenizer import Tokenizer

    if model is None:
        if not (DEFAULT_MODEL / "config.json").is_file():
            raise CheckpointError(f"the built-in model is not installed at {DEFAULT_MODEL}; pass a model path")
        model = DEFAULT_MODEL
    path = resolve(model)
    net, config, layout = load_model(path, dtype=parse_dtype(dtype), device=device, quantize=quantize)
    tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
    return LLM(net, tokenizer, path=path, layout=layout, max_context=max_context)
