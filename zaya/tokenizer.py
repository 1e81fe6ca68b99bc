"""Text <-> token ids for ZAYA1 checkpoints, on top of the `tokenizers` library.

ZAYA1 uses the Gemma-3 vocabulary (bos 2 `<bos>`, pad 0, eos 106 `<end_of_turn>`). The reference
(transformers 5.23, `AutoTokenizer`) encodes plain text as `[2, ..., 106]`: BOS in front *and*
`<end_of_turn>` at the end. That post-processing is not ours to choose, because parity tests must
start from the same ids, so `encode` reproduces the reference exactly:

* When the directory has a `tokenizer.json`, transformers 5.23 drops `add_bos_token` /
  `add_eos_token` from `tokenizer_config.json` (`_from_pretrained` pops them) and keeps the
  post-processor serialized in `tokenizer.json`. So the file's post-processor is the truth, and
  those two config keys are read but change nothing.
* Only flags passed explicitly at load time (`from_pretrained(dir, add_bos_token=...)`) make
  transformers rebuild the post-processor (`update_post_processor`): `[bos] $A [eos]`, each part
  present when its flag is true, an unset flag counting as false. `Tokenizer.from_dir` takes the
  same two keyword arguments and builds the same template.

For generation from raw text, `encode_prompt` keeps the leading special tokens and drops the
trailing ones: a prompt that ends in `<end_of_turn>` would ask the model to start a new turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _Backend
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from zaya.errors import CheckpointError

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
# transformers' GemmaTokenizer (the class `zaya` maps to) fills these in when the config omits them.
_GEMMA_DEFAULTS = {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
                   "mask_token": "<mask>"}  # fmt: skip
_GEMMA_CLASSES = {"GemmaTokenizer", "GemmaTokenizerFast"}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _token_str(value) -> str | None:
    """Special tokens are stored as a string or as a serialized AddedToken `{"content": ...}`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_chat_templates(path: Path, config: dict) -> dict[str, str]:
    """Named templates, in transformers' order of precedence: `chat_template.jinja` and
    `additional_chat_templates/*.jinja` win over `chat_template` in tokenizer_config.json."""
    templates: dict[str, str] = {}
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    if templates:
        return templates
    value = config.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token facts generation needs.

    Build it with `Tokenizer.from_dir(path)`. `eos_ids` is the union of the tokenizer's eos token,
    `generation_config.json`'s and `config.json`'s `eos_token_id`: a ZAYA1 turn ends at
    `<end_of_turn>` even though Gemma's own `<eos>` also exists.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: dict[str, str] | None = None,
        extra_eos_ids: list[int] | tuple[int, ...] = (),
        extra_pad_id: int | None = None,
        chat_templates: dict[str, str] | None = None,
    ):
        self.backend = backend
        # Lengths must never change behind the engine's back (HF disables these per call too).
        backend.no_truncation()
        backend.no_padding()
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.chat_templates = dict(chat_templates or {})
        self.bos_id = self._id_of("bos_token")
        self.eos_id = self._id_of("eos_token")
        self.pad_id = self._id_of("pad_token")
        if self.pad_id is None:
            self.pad_id = extra_pad_id
        self.eos_ids: set[int] = {i for i in [self.eos_id, *extra_eos_ids] if i is not None}
        added = backend.get_added_tokens_decoder()
        self.special_ids: set[int] = {i for i, tok in added.items() if tok.special}
        # Gemma-style vocabularies spell raw bytes as "<0xNN>"; the ByteFallback decoder decides
        # whether a whole run of them is valid UTF-8, so streaming must not split such a run.
        self.byte_fallback_ids: set[int] = {
            i for b in range(256) if (i := backend.token_to_id(f"<0x{b:02X}>")) is not None
        }
        # The post-processor's fixed prefix (e.g. [bos]); probed once on a non-empty text.
        probe = backend.encode("a")
        n_lead = 0
        while n_lead < len(probe.ids) and probe.sequence_ids[n_lead] is None:
            n_lead += 1
        self._prompt_prefix = probe.ids[:n_lead]

    def _id_of(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @classmethod
    def from_dir(cls, path, *, add_bos_token: bool | None = None, add_eos_token: bool | None = None) -> Tokenizer:
        """Load `tokenizer.json` and its companions from a checkpoint directory.

        `add_bos_token` / `add_eos_token` mirror the same keyword arguments of transformers'
        `from_pretrained`: when either is given, the post-processor is rebuilt from them (see the
        module docstring); otherwise `tokenizer.json`'s own post-processor is used.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer directory {path} does not exist")
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{tok_file} is missing: a zaya tokenizer needs a tokenizer.json file")
        try:
            backend = _Backend.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            _read_json(tok_file)  # says "not valid JSON" when that is the problem
            raise CheckpointError(f"{tok_file} could not be loaded by `tokenizers` ({e})") from e

        config = _read_json(path / "tokenizer_config.json") or {}
        special = {name: _token_str(config.get(name)) for name in _SPECIAL_NAMES}
        # Like transformers: special_tokens_map.json is a legacy source, consulted (and winning)
        # only when tokenizer_config.json has no added_tokens_decoder.
        if "added_tokens_decoder" not in config:
            for name, value in (_read_json(path / "special_tokens_map.json") or {}).items():
                if name in _SPECIAL_NAMES and _token_str(value) is not None:
                    special[name] = _token_str(value)
        model_config = _read_json(path / "config.json") or {}
        tok_class = config.get("tokenizer_class")
        if tok_class in _GEMMA_CLASSES or (tok_class is None and model_config.get("model_type") == "zaya"):
            for name, default in _GEMMA_DEFAULTS.items():
                special[name] = special[name] or default
            _use_gemma_pipeline(backend, special["unk_token"])

        if add_bos_token is not None or add_eos_token is not None:
            _set_template_post_processor(backend, special, bool(add_bos_token), bool(add_eos_token))

        gen_config = _read_json(path / "generation_config.json") or {}
        extra_eos = _as_id_list(gen_config.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))
        pad = _as_id_list(gen_config.get("pad_token_id")) or _as_id_list(model_config.get("pad_token_id"))
        return cls(
            backend,
            special_tokens=special,
            extra_eos_ids=extra_eos,
            extra_pad_id=pad[0] if pad else None,
            chat_templates=_read_chat_templates(path, config),
        )

    # -- encoding -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids exactly as `AutoTokenizer.from_pretrained(dir)(text)["input_ids"]` gives them.

        Lone surrogates (valid in JSON escapes, invalid in UTF-8) become U+FFFD instead of an error."""
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            if not isinstance(text, str):
                raise
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_prompt(self, text: str) -> list[int]:
        """Ids for a raw-text generation prompt: the post-processor's leading tokens (BOS when the
        tokenizer adds one) plus the text's tokens, and never the trailing ones.

        ZAYA1's post-processor appends `<end_of_turn>`, which is right for scoring a finished
        sequence but wrong for a prompt to be continued. Chat prompts rendered by a template carry
        their own `<bos>`; encode those with `encode(text, add_special_tokens=False)`.
        """
        return self._prompt_prefix + self.encode(text, add_special_tokens=False)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # -- vocabulary -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Ids the tokenizer can produce, added tokens included (the model may have more rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def chat_template(self) -> str | None:
        """The checkpoint's default chat template, or None when it ships none."""
        return self.chat_templates.get("default")

    def chat_template_for(self, tools=None) -> str | None:
        """transformers' choice among named templates: `tool_use` when tools are given and it
        exists, else `default`."""
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        return self.chat_template

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_ids={sorted(self.eos_ids)}, "
                f"pad_id={self.pad_id})")  # fmt: skip


def _use_gemma_pipeline(backend: _Backend, unk_token: str) -> None:
    """transformers' GemmaTokenizer keeps only the vocabulary, merges and post-processor of
    tokenizer.json and rebuilds the rest from its class code; do the same so both agree even
    if a checkpoint's tokenizer.json says otherwise."""
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    if isinstance(backend.model, BPE):
        model = backend.model
        model.byte_fallback, model.fuse_unk, model.unk_token = True, True, unk_token
        model.dropout, model.ignore_merges = None, False


def _set_template_post_processor(backend: _Backend, special: dict, add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: `[bos:0] $A:0 [eos:0]`; a flag whose token is
    unknown is dropped, as transformers turns it off when the token is None."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    bos_id = backend.token_to_id(bos) if bos else None
    eos_id = backend.token_to_id(eos) if eos else None
    add_bos = add_bos and bos_id is not None
    add_eos = add_eos and eos_id is not None
    single = f"{bos}:0 " * add_bos + "$A:0" + f" {eos}:0" * add_eos
    pair = single + f" {bos}:1" * add_bos + " $B:1" + f" {eos}:1" * add_eos
    tokens = [(bos, bos_id)] * add_bos + [(eos, eos_id)] * add_eos
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=tokens)


class IncrementalDecoder:
    """Streaming detokenization: `push(id)` returns the text that became final, `flush()` the rest.

    The concatenated output always equals `tokenizer.decode(all_ids)`. Each step decodes a small
    window, from `prefix_offset` (context, so decoders that treat a sequence's first token
    specially see the same neighbourhood) to the end, and emits what extends past the already
    emitted `[prefix_offset, read_offset)` part. Text is held back while it ends in U+FFFD (an
    incomplete UTF-8 sequence) or while the last visible token is a "<0xNN>" byte token, because
    the ByteFallback decoder turns a whole run of byte tokens into U+FFFD when any of it is
    invalid, so a run's text is final only once the run ends.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self._in_byte_run = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        skipped = self.skip_special_tokens and token_id in self.tokenizer.special_ids
        if not skipped:  # a skipped special token is invisible to the decoder, so runs continue
            self._in_byte_run = token_id in self.tokenizer.byte_fallback_ids
        if self._in_byte_run:
            return ""
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit everything still held back (possibly U+FFFD for a truncated character)."""
        self._in_byte_run = False
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset], self.skip_special_tokens)
        new_text = decode(self.ids[self.prefix_offset :], self.skip_special_tokens)
        if not final and new_text.endswith("\ufffd"):
            return ""
        if len(self.ids) == self.read_offset:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new_text[len(prefix_text) :]
