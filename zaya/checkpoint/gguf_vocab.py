"""The tokenizer and chat template of a GGUF file, rebuilt with ``tokenizers`` from its metadata.

A ZAYA GGUF (llama.cpp PR #23112's converter) stores the Gemma-3 vocabulary of ZAYA1 as
``tokenizer.ggml.model = "gemma4"`` with ``tokens``, ``token_type`` and BPE ``merges``: the
tokens of ``tokenizer.json`` in id order, special tokens typed CONTROL, raw bytes as ``<0xNN>``. That is a BPE with byte fallback whose spaces are "▁", the
pipeline transformers' GemmaTokenizer builds, so the same ids come out. ``gpt2`` vocabularies are
rebuilt as byte-level BPE. The BOS / EOS flags become the post-processor, as the converter read them
from ``tokenizer.json``; ``<end_of_turn>`` and ``<eos>``, when the vocabulary has them, also end
generation (llama.cpp treats them as end-of-generation tokens too; a GGUF file carries no
``generation_config.json``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tokenizers import Tokenizer as Backend

from zaya.errors import CheckpointError
from zaya.tokenizer import Tokenizer

CONTROL, USER_DEFINED, BYTE = 3, 4, 6
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
GEMMA_STYLE = ("gemma", "gemma3", "gemma4", "llama")
END_OF_GENERATION = ("<end_of_turn>", "<eos>")  # Gemma vocabularies: a turn, a document


def _value(fields, key: str, default=None):
    f = fields.get(key)
    return default if f is None else f.contents()


def _added(token: str, kind: int, merged: set[str]) -> bool:
    """Whether a vocabulary entry was an added token of ``tokenizer.json``: typed so, or (the
    converter types added tokens that are not special NORMAL) a multi-character entry that no
    merge produces and that is not a raw byte, which only an added token can be."""
    if kind in (CONTROL, USER_DEFINED):
        return True
    return kind != BYTE and len(token) > 1 and token not in merged and not BYTE_TOKEN.fullmatch(token)


def _pipeline(style: str) -> dict:
    if style == "gpt2":
        level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        return {"normalizer": None, "pre_tokenizer": level, "decoder": level}
    return {
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                          "invert": False},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
    }


def _post_processor(tokens: list[str], bos: int | None, eos: int | None) -> dict | None:
    parts = [(tokens[i], i) for i in (bos, eos) if i is not None]
    if not parts:
        return None
    single = ([{"SpecialToken": {"id": tokens[bos], "type_id": 0}}] if bos is not None else []) + \
        [{"Sequence": {"id": "A", "type_id": 0}}] + \
        ([{"SpecialToken": {"id": tokens[eos], "type_id": 0}}] if eos is not None else [])
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    return {"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in parts}}


def tokenizer_json(fields, where: str) -> dict:
    """A ``tokenizer.json`` dict equivalent to the GGUF vocabulary in ``fields``."""
    style = _value(fields, "tokenizer.ggml.model")
    tokens = _value(fields, "tokenizer.ggml.tokens")
    merges = _value(fields, "tokenizer.ggml.merges")
    if tokens is None:
        raise CheckpointError(f"{where} has no vocabulary (tokenizer.ggml.tokens)")
    if style not in GEMMA_STYLE + ("gpt2",) or not merges:
        raise CheckpointError(f"{where}: tokenizer model {style!r} {'without merges ' if not merges else ''}is not "
                              "supported; zaya rebuilds BPE vocabularies (gemma / llama with merges, gpt2)")
    types = _value(fields, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merged = {m.replace(" ", "", 1) for m in merges}
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == CONTROL} for i, t in enumerate(tokens) if _added(t, types[i], merged)]
    flag = lambda key, default: bool(_value(fields, key, default))  # noqa: E731
    bos, eos = _value(fields, "tokenizer.ggml.bos_token_id"), _value(fields, "tokenizer.ggml.eos_token_id")
    unk = _value(fields, "tokenizer.ggml.unknown_token_id")
    gemma = style != "gpt2"
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        **_pipeline(style),
        "post_processor": _post_processor(tokens, bos if flag("tokenizer.ggml.add_bos_token", gemma) else None,
                                          eos if flag("tokenizer.ggml.add_eos_token", False) else None),
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if gemma and unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": gemma,
                  "byte_fallback": gemma, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in merges]},
    }


def chat_templates(fields) -> dict[str, str]:
    templates = {}
    if (default := _value(fields, "tokenizer.chat_template")) is not None:
        templates["default"] = default
    for name in _value(fields, "tokenizer.chat_templates") or []:
        if (text := _value(fields, f"tokenizer.chat_template.{name}")) is not None:
            templates[name] = text
    return templates


def gguf_tokenizer(fields, path: Path) -> Tokenizer:
    """zaya's ``Tokenizer`` for a GGUF file's vocabulary, special tokens and chat templates."""
    spec = tokenizer_json(fields, path.name)
    try:
        backend = Backend.from_str(json.dumps(spec))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise CheckpointError(f"{path}: its vocabulary does not make a tokenizer ({exc})") from None
    tokens = _value(fields, "tokenizer.ggml.tokens")
    special = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = _value(fields, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            special[name] = tokens[i]
    extra_eos = [i for key in ("eot", "eom") if (i := _value(fields, f"tokenizer.ggml.{key}_token_id")) is not None]
    extra_eos += [i for t in END_OF_GENERATION if (i := backend.token_to_id(t)) is not None]
    return Tokenizer(backend, special_tokens=special, extra_eos_ids=extra_eos, chat_templates=chat_templates(fields))
