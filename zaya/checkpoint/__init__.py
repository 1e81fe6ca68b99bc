"""Checkpoints on disk: every file read and written by zaya's models goes through this package.

* ``hub``: a local directory or a hub repo id (``resolve``);
* ``files``: the safetensors index and plain (pread) reads;
* ``layouts``: config.json and the native / legacy tensor names;
* ``directory``: a checkpoint directory as the loader reads it;
* ``loader``: ``load_model``, one pipeline of named steps;
* ``adapters``: LoRA adapters in PEFT's format: read, write, apply to a model;
* ``writer``: ``save``, ``convert``, ``save_quantized``, ``merge_adapter``;
* ``gguf`` / ``gguf_names`` / ``gguf_vocab``: ZAYA GGUF files (weights, config, tokenizer);
* ``compressed``: compressed-tensors checkpoints (FP8, MXFP4);
* ``tokenizers``: the tokenizer that goes with a checkpoint.
"""

from zaya.checkpoint.directory import SafetensorsCheckpoint
from zaya.checkpoint.files import INDEX_FILE, SINGLE_FILE
from zaya.checkpoint.hub import download, resolve
from zaya.checkpoint.layouts import detect_layout, read_config
from zaya.checkpoint.loader import load_model, open_checkpoint
from zaya.checkpoint.adapters import is_adapter_dir, load_adapter, read_adapter, save_adapter
from zaya.checkpoint.writer import convert, merge_adapter, save, save_quantized, state_for_saving, tokenizer_files
from zaya.checkpoint.tokenizers import load_tokenizer

__all__ = ["INDEX_FILE", "SINGLE_FILE", "SafetensorsCheckpoint", "convert", "detect_layout", "download",
           "is_adapter_dir", "load_adapter", "load_model", "load_tokenizer", "merge_adapter", "open_checkpoint",
           "read_adapter", "read_config", "resolve", "save", "save_adapter", "save_quantized", "state_for_saving",
           "tokenizer_files"]
