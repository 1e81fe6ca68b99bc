"""A small byte-level BPE tokenizer for the built-in model, trained with `tokenizers` on task text.

Ids 0-12 are fixed so that zaya's chat template and generation defaults line up::

    0 <pad>  1 <eos>  2 <bos>  3 <unk>  4 <mask>  5 <start_of_turn>  6 <end_of_turn>
    7 <think>  8 </think>  9 <zyphra_tool_call>  10 </zyphra_tool_call>
    11 <zyphra_tool_response>  12 </zyphra_tool_response>

0-6 are special (dropped by ``skip_special_tokens``); the tag tokens 7-12 are not, so reasoning
and tool-call markup survive decoding, as in Qwen3-style vocabularies. ``<end_of_turn>`` is the
eos, as in ZAYA1. Digits are always split one per token: a number's tokens are then its digits,
which is what lets a small model learn carrying instead of memorising a table of sums.
The post-processor adds ``<bos>`` only; chat prompts are rendered with their own ``<bos>``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from zaya.chat import DEFAULT_CHAT_TEMPLATE

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TAGS = ["<think>", "</think>", "<zyphra_tool_call>", "</zyphra_tool_call>",
        "<zyphra_tool_response>", "</zyphra_tool_response>"]
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 6


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A `tokenizers.Tokenizer` trained on ``texts`` (ids as in the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL + TAGS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return tok


def save_tokenizer(tok, out_dir: str | Path, model_max_length: int = 1024) -> Path:
    """Write tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        added["special"] = added["content"] in SPECIAL
        assert data["model"]["vocab"].get(added["content"], added["id"]) == added["id"]
    for i, name in enumerate(SPECIAL + TAGS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"token {name} got id {tok.token_to_id(name)}, expected {i}")
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
        "unk_token": "<unk>", "mask_token": "<mask>",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(a["id"]): {k: v for k, v in a.items() if k != "id"}
                                 for a in data["added_tokens"]},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (out / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE, encoding="utf-8")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": [END_OF_TURN_ID, EOS_ID], "pad_token_id": PAD_ID,
           "temperature": 1.0, "top_p": 1.0}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=1), encoding="utf-8")
    return out
