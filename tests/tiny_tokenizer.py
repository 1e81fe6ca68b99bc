"""A tiny, deterministic tokenizer directory for tests (no downloads).

`make_tokenizer_dir(path, vocab_size=512)` writes `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` and `generation_config.json` into `path` and returns it.

Default style ("gemma"): the same pipeline as the Gemma-3 / ZAYA1 tokenizer, a BPE with byte
fallback where spaces become "▁" (`tokenizer_class: GemmaTokenizer`), so transformers rebuilds it
exactly like it rebuilds the real checkpoint's. `byte_level=True` writes a GPT-2-style byte-level
BPE instead (`tokenizer_class: TokenizersBackend`). In both, characters outside the tiny training
corpus (emoji, most non-Latin text) split into several tokens, one per UTF-8 byte.

Token ids (both styles):

    0 <pad>   1 <eos>   2 <bos>   3 <unk>   4 <mask>
    5 <start_of_turn>   6 <end_of_turn>
    7 <think>   8 </think>
    9 <zyphra_tool_call>   10 </zyphra_tool_call>
    11 <zyphra_tool_response>   12 </zyphra_tool_response>
    13..268   the 256 bytes (gemma: "<0x00>".."<0xFF>"; byte_level: the byte-level alphabet)
    then      characters of the corpus (gemma only), merges, then "<unusedN>" filler up to vocab_size

vocab_size is exact (the smallest allowed: 386 gemma, 269 byte_level), so it can equal a tiny
model's embedding rows.

Ids 0-6 are special (skipped by `skip_special_tokens`); 7-12 are added tokens that are *not*
special, as in Qwen3-style tokenizers, so reasoning and tool-call tags survive decoding.
Like ZAYA1 (eos 106 = `<end_of_turn>`), eos is `<end_of_turn>` (6), and generation_config.json
adds `<eos>` (1). With the defaults, plain encoding gives `[2, ..., 6]` like the HF integration
test of ZAYA1; `add_bos=False` / `add_eos=False` change the tokenizer.json post-processor.
"""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
START_OF_TURN_ID, END_OF_TURN_ID = 5, 6
THINK_ID, END_THINK_ID = 7, 8
TOOL_CALL_ID, END_TOOL_CALL_ID, TOOL_RESPONSE_ID, END_TOOL_RESPONSE_ID = 9, 10, 11, 12
FIRST_BYTE_ID = 13

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TAG_TOKENS = [
    "<think>", "</think>",
    "<zyphra_tool_call>", "</zyphra_tool_call>",
    "<zyphra_tool_response>", "</zyphra_tool_response>",
]  # fmt: skip

_CORPUS = """\
The quick brown fox jumps over the lazy dog. What is 12 + 30? The answer is 42.
Hello! How can I assist you today? Let me think about this step by step.
user: Please write a short poem about the sea and the sky.
model: The sea is wide, the sky is high, and the wind goes by.
A function takes parameters and returns a value; the tool call gives the weather in Paris.
{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
def add(a, b):\n    return a + b\n
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -7 ## Title * item - item
Café, naïve, résumé, 中文, 日本語, Ελληνικά, Привет.
"""
_EXTRA_CHARS = "".join(chr(c) for c in range(32, 127)) + "\n\t"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, used by tokenizers' ByteLevel."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _learn_merges(words: Counter, vocab: dict[str, int], vocab_size: int) -> list[list[str]]:
    """Plain BPE training. Ties go to the lexicographically largest pair, so output is stable."""
    words = {tuple(w): c for w, c in words.items()}
    merges: list[list[str]] = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(list(best))
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def _added(content: str, token_id: int, special: bool) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": special}  # fmt: skip


def _post_processor(add_bos: bool, add_eos: bool) -> dict | None:
    if not (add_bos or add_eos):
        return None
    single = ([{"SpecialToken": {"id": "<bos>", "type_id": 0}}] if add_bos else []) + [
        {"Sequence": {"id": "A", "type_id": 0}}
    ]
    if add_eos:
        single.append({"SpecialToken": {"id": "<end_of_turn>", "type_id": 0}})
    pair = single + [{"Sequence": {"id": "B", "type_id": 1}}]
    specials = {}
    if add_bos:
        specials["<bos>"] = {"id": "<bos>", "ids": [BOS_ID], "tokens": ["<bos>"]}
    if add_eos:
        specials["<end_of_turn>"] = {"id": "<end_of_turn>", "ids": [END_OF_TURN_ID], "tokens": ["<end_of_turn>"]}
    return {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}


def make_tokenizer_dir(
    path,
    vocab_size: int = 512,
    *,
    byte_level: bool = False,
    add_bos: bool = True,
    add_eos: bool = True,
    config_flags: dict | None = None,
    chat_template: str | list | None = None,
    generation_config: bool = True,
) -> Path:
    """Write a tiny tokenizer into `path` (created if needed) and return it as a Path.

    `config_flags` is merged into tokenizer_config.json (e.g. `{"add_bos_token": False}`; the default
    mirrors `add_bos`/`add_eos`). `chat_template` (a string or HF's list of `{"name", "template"}`)
    goes into tokenizer_config.json when given.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tags = SPECIAL_TOKENS + TAG_TOKENS
    vocab = {tok: i for i, tok in enumerate(tags)}
    if byte_level:
        byte_chars = _bytes_to_unicode()
        for b in range(256):
            vocab[byte_chars[b]] = len(vocab)
        # ByteLevel pre-tokenization splits on words with their leading space (GPT-2 regex);
        # this approximation is only used for training merges.
        words = Counter()
        for line in _CORPUS.splitlines(keepends=True):
            for i, part in enumerate(line.split(" ")):
                piece = (" " if i else "") + part
                words[tuple(byte_chars[b] for b in piece.encode())] += 1
    else:
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for ch in sorted(set(_CORPUS.replace(" ", "▁")) | set(_EXTRA_CHARS.replace(" ", "▁"))):
            vocab.setdefault(ch, len(vocab))
        words = Counter()
        for line in _CORPUS.splitlines(keepends=True):
            for i, part in enumerate(line.split(" ")):
                words[tuple(("▁" if i else "") + part)] += 1
    if vocab_size < len(vocab):
        raise ValueError(f"vocab_size must be at least {len(vocab)} for this tokenizer style")
    merges = _learn_merges(words, vocab, vocab_size)
    while len(vocab) < vocab_size:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)

    added = [_added(t, i, special=i < len(SPECIAL_TOKENS)) for i, t in enumerate(tags)]
    if byte_level:
        pipeline = {
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        }
        model_extra = {"byte_fallback": False, "unk_token": None}
    else:
        pipeline = {
            "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
            "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False},
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ]},
        }  # fmt: skip
        model_extra = {"byte_fallback": True, "unk_token": "<unk>"}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": pipeline["normalizer"],
        "pre_tokenizer": pipeline["pre_tokenizer"],
        "post_processor": _post_processor(add_bos, add_eos),
        "decoder": pipeline["decoder"],
        "model": {"type": "BPE", "dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": not byte_level, "ignore_merges": False, "vocab": vocab, "merges": merges,
                  **model_extra},
    }  # fmt: skip
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False, indent=1), encoding="utf-8")

    names = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<end_of_turn>", "unk_token": "<unk>"}
    config = {
        "tokenizer_class": "TokenizersBackend" if byte_level else "GemmaTokenizer",
        **names,
        "mask_token": "<mask>",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "model_max_length": 4096,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added},
    }
    config.update(config_flags or {})
    if chat_template is not None:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(names, indent=1), encoding="utf-8")
    if generation_config:
        gen = {"bos_token_id": BOS_ID, "eos_token_id": [END_OF_TURN_ID, EOS_ID], "pad_token_id": PAD_ID}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=1), encoding="utf-8")
    return path
