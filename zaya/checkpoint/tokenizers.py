"""The tokenizer that goes with a checkpoint: ``tokenizer.json`` and its companions in a directory,
or the vocabulary in a GGUF file's metadata."""

from __future__ import annotations

from pathlib import Path

from zaya.checkpoint.gguf import read_gguf
from zaya.checkpoint.gguf_vocab import gguf_tokenizer
from zaya.tokenizer import Tokenizer


def load_tokenizer(path: Path) -> Tokenizer | None:
    """The checkpoint's tokenizer, or None when it ships none."""
    path = Path(path)
    if path.is_file():
        fields = read_gguf(path).fields
        return gguf_tokenizer(fields, path) if "tokenizer.ggml.tokens" in fields else None
    return Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None
