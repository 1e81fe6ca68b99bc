"""Which grammar library zaya uses for constrained decoding: llguidance, xgrammar or outlines-core,
measured on CPU on the built-in model's vocabulary (768 tokens) and on a synthetic Gemma-style
vocabulary of ZAYA1's size (262,272 tokens, byte fallback, no download).

    pip install llguidance xgrammar outlines-core      # the candidates (only llguidance is a dependency)
    python benchmarks/grammar_libraries.py --threads 1

For each library and vocabulary: the one-off cost of building its tokenizer index, the cost of
compiling a JSON schema (paid per request: every request may bring a new schema), and the per-token
cost of computing the next-token mask and accepting the sampled token, walked along a schema-valid
JSON document token by token (each token checked against the mask). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zaya.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "score"],
}
DOC = {"name": "Ada Lovelace wrote the first program for the Analytical Engine", "age": 36,
       "tags": ["mathematics", "poetry of science", "notes on the engine"],
       "address": {"city": "London", "zip": "W1 4AB"}, "score": 97.25}
TEXT = json.dumps(DOC, separators=(",", ":"))

_ALPHABET = "abcdefghijklmnopqrstuvwxyzabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789" \
            ".,:;!?'\"(){}[]<>/\\-_=+*&%$#@"


def synthetic_tokenizer(size: int, seed: int = 0) -> Tokenizer:
    """A Gemma-style BPE vocabulary of ``size`` tokens (specials, 256 byte tokens, random pieces,
    many starting with the word marker), written with `tokenizers` and loaded as zaya loads one."""
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    rng = random.Random(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<think>",
                "</think>", "<zyphra_tool_call>", "</zyphra_tool_call>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in _ALPHABET + "▁":
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < size:
        piece = "".join(rng.choice(_ALPHABET) for _ in range(rng.choice((1, 2, 3, 3, 4, 5, 6, 8, 10, 12))))
        vocab.setdefault(("▁" + piece) if rng.random() < 0.45 else piece, len(vocab))
    backend = Backend(BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    backend.add_special_tokens(specials)
    folder = Path(tempfile.mkdtemp(prefix="zaya-synth-tok-"))
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<end_of_turn>"}))
    return Tokenizer.from_dir(folder)


def token_strings(tok: Tokenizer) -> list[str]:
    return [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]


# -- the libraries --------------------------------------------------------------------------------
class LLGuidance:
    name = "llguidance"

    def __init__(self, tok: Tokenizer):
        import llguidance

        self.ll = llguidance
        self.vocab = tok.vocab_size
        self.info = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                           eos_token=sorted(tok.eos_ids))

    def compile(self, schema):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        return grammar

    def matcher(self, compiled):
        m = self.ll.LLMatcher(self.info, compiled)
        assert not m.is_error(), m.get_error()
        self.mask = torch.zeros((self.vocab + 31) // 32, dtype=torch.int32)
        return m

    def step(self, m, token: int) -> bool:
        m.unsafe_compute_mask_ptr(self.mask.data_ptr(), self.mask.numel() * 4)
        ok = bool((int(self.mask[token // 32]) >> (token % 32)) & 1)
        m.consume_token(token)
        return ok


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok: Tokenizer):
        import xgrammar as xgr

        self.xgr = xgr
        self.info = xgr.TokenizerInfo(token_strings(tok), vocab_type=xgr.VocabType.BYTE_FALLBACK,
                                      vocab_size=tok.vocab_size, stop_token_ids=sorted(tok.eos_ids))
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                 separators=(",", ":"))

    def matcher(self, compiled):
        self.mask = self.xgr.allocate_token_bitmask(1, self.info.vocab_size)
        return self.xgr.GrammarMatcher(compiled)

    def step(self, m, token: int) -> bool:
        m.fill_next_token_bitmask(self.mask)
        ok = bool((int(self.mask[0, token // 32]) >> (token % 32)) & 1)
        m.accept_token(token)
        return ok


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok: Tokenizer):
        import outlines_core

        self.oc = outlines_core
        eos = min(tok.eos_ids)
        table: dict = {}
        for i, s in enumerate(token_strings(tok)):
            if i in tok.eos_ids or i in tok.special_ids or not s:
                continue
            if s.startswith("<0x") and len(s) == 6:
                key = bytes([int(s[3:5], 16)])
            else:
                key = s.replace("▁", " ").encode()
            table.setdefault(key, []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, table)
        self.size = tok.vocab_size

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), "")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        self.mask = torch.zeros((self.size + 31) // 32, dtype=torch.int32)
        return self.oc.Guide(compiled)

    def step(self, m, token: int) -> bool:
        m.write_mask_into(self.mask.data_ptr(), self.mask.numel(), 4)
        ok = bool((int(self.mask[token // 32]) >> (token % 32)) & 1)
        m.advance(token)
        return ok


LIBRARIES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore}


def measure(lib_cls, tok: Tokenizer, rounds: int) -> dict:
    t0 = time.perf_counter()
    lib = lib_cls(tok)
    index_s = time.perf_counter() - t0
    tokens = tok.encode(TEXT, add_special_tokens=False)
    compiles, per_token = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        compiled = lib.compile(SCHEMA)
        m = lib.matcher(compiled)
        compiles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for t in tokens:
            if not lib.step(m, t):
                raise AssertionError(f"{lib.name} refused a token of a valid document")
        per_token.append((time.perf_counter() - t0) / len(tokens))
    return {"index_s": round(index_s, 3), "compile_ms": round(statistics.median(compiles) * 1e3, 2),
            "per_token_us": round(statistics.median(per_token) * 1e6, 1), "tokens": len(tokens)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--libraries", default=",".join(LIBRARIES))
    ap.add_argument("--vocab", default="builtin,262272", help="builtin and/or synthetic sizes")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for v in args.vocab.split(","):
        tok = Tokenizer.from_dir(ROOT / "zaya" / "assets" / "zaya-tiny") if v == "builtin" \
            else synthetic_tokenizer(int(v))
        for name in args.libraries.split(","):
            try:
                r = measure(LIBRARIES[name], tok, args.rounds)
            except ImportError as exc:
                r = {"error": f"not installed ({exc})"}
            except Exception as exc:  # noqa: BLE001 - a library that fails is a result too
                r = {"error": f"{type(exc).__name__}: {exc}"}
            results[f"{name}/{tok.vocab_size}"] = r
            print(f"{name:14s} vocab {tok.vocab_size:7d}: {r}", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
