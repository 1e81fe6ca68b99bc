"""zaya.tokenizer against transformers 5.23 (the oracle) on tiny tokenizer directories."""

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.tiny_tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, PAD_ID, make_tokenizer_dir

from zaya.errors import CheckpointError
from zaya.tokenizer import IncrementalDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello! How can I assist you today?",
    "",
    " leading and trailing spaces  ",
    "emoji 😀👍🏽 and 中文 and naïve café",
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n<think>\nhmm\n</think>\n\nok",
    "<zyphra_tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n</zyphra_tool_call>",
    "tabs\tand\nnewlines\n\n\nend",
]

# (byte_level, add_bos, add_eos written into tokenizer.json, flags written into tokenizer_config.json)
VARIANTS = [
    (False, True, True, None),
    (False, True, False, None),
    (False, False, False, None),
    (False, False, False, {"add_bos_token": True, "add_eos_token": True}),  # ignored by HF 5.23
    (False, True, True, {"add_bos_token": False, "add_eos_token": False}),
    (True, True, True, None),
    (True, False, False, {"add_bos_token": True}),
]


@pytest.mark.parametrize("byte_level,add_bos,add_eos,flags", VARIANTS)
def test_encode_decode_match_transformers(tmp_path, byte_level, add_bos, add_eos, flags):
    path = make_tokenizer_dir(tmp_path, byte_level=byte_level, add_bos=add_bos, add_eos=add_eos, config_flags=flags)
    ours = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref(text, add_special_tokens=special)["input_ids"], (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("byte_level", [False, True])
@pytest.mark.parametrize("overrides", [{"add_bos_token": True}, {"add_eos_token": True},
                                       {"add_bos_token": True, "add_eos_token": True},
                                       {"add_bos_token": False, "add_eos_token": False}])  # fmt: skip
def test_explicit_bos_eos_flags_rebuild_post_processor_like_transformers(tmp_path, byte_level, overrides):
    path = make_tokenizer_dir(tmp_path, byte_level=byte_level)
    ours = Tokenizer.from_dir(path, **overrides)
    ref = transformers.AutoTokenizer.from_pretrained(str(path), **overrides)
    for text in TEXTS:
        assert ours.encode(text) == ref(text)["input_ids"], text


def test_gemma_class_pipeline_is_rebuilt_like_transformers(tmp_path):
    # transformers' GemmaTokenizer ignores tokenizer.json's normalizer/decoder/BPE flags
    path = make_tokenizer_dir(tmp_path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["normalizer"] = spec["pre_tokenizer"] = spec["decoder"] = None
    spec["model"]["byte_fallback"] = False
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours = Tokenizer.from_dir(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert ours.decode(ids) == ref.decode(ids)


def test_zaya1_style_post_processing(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    body = tok.encode("Hello! How can I assist you today?", add_special_tokens=False)
    assert tok.encode("Hello! How can I assist you today?") == [BOS_ID, *body, END_OF_TURN_ID]
    assert tok.encode_prompt("Hello! How can I assist you today?") == [BOS_ID, *body]
    assert tok.encode_prompt("") == [BOS_ID]


def test_encode_prompt_without_bos(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, add_bos=False, add_eos=True))
    assert tok.encode_prompt("hi there") == tok.encode("hi there", add_special_tokens=False)
    assert tok.encode("hi there")[-1] == END_OF_TURN_ID


def test_special_ids_and_vocab(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert (tok.bos_id, tok.pad_id, tok.eos_id) == (BOS_ID, PAD_ID, END_OF_TURN_ID)
    assert tok.eos_ids == {END_OF_TURN_ID, EOS_ID}  # tokenizer eos + generation_config.json
    assert tok.vocab_size == 512
    assert tok.id_to_token(END_OF_TURN_ID) == "<end_of_turn>"
    assert tok.token_to_id("<think>") == 7
    assert tok.token_to_id("no such token") is None
    assert tok.special_ids == set(range(7))
    assert len(tok.byte_fallback_ids) == 256
    assert tok.chat_template is None
    assert "eos_ids=[1, 6]" in repr(tok)


def test_eos_from_config_json_and_gemma_defaults(tmp_path):
    path = make_tokenizer_dir(tmp_path, generation_config=False)
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "pad_token"):
        del config[key]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(json.dumps({"model_type": "zaya", "eos_token_id": [106 - 100]}))
    tok = Tokenizer.from_dir(path)
    # GemmaTokenizer's defaults: bos "<bos>", eos "<eos>", pad "<pad>"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert tok.eos_ids == {EOS_ID, END_OF_TURN_ID}


def test_special_tokens_map_is_legacy_fallback(tmp_path):
    path = make_tokenizer_dir(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    assert Tokenizer.from_dir(path).eos_id == END_OF_TURN_ID  # config has added_tokens_decoder
    del config["added_tokens_decoder"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(path).eos_id == EOS_ID
    assert transformers.AutoTokenizer.from_pretrained(str(path)).eos_token_id == EOS_ID


def test_chat_template_sources(tmp_path):
    named = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    path = make_tokenizer_dir(tmp_path, chat_template=named)
    tok = Tokenizer.from_dir(path)
    assert tok.chat_template == "D"
    assert tok.chat_template_for(tools=[{"name": "f"}]) == "T"
    assert tok.chat_template_for(tools=None) == "D"
    (path / "chat_template.jinja").write_text("FILE")
    assert Tokenizer.from_dir(path).chat_template == "FILE"
    assert transformers.AutoTokenizer.from_pretrained(str(path)).chat_template == "FILE"


def test_chat_template_string_in_config(tmp_path):
    tok = Tokenizer.from_dir(make_tokenizer_dir(tmp_path, chat_template="{{ messages[0].content }}"))
    assert tok.chat_template == "{{ messages[0].content }}"


def test_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(CheckpointError, match="tokenizer.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(CheckpointError, match="tokenizer.json could not be loaded"):
        Tokenizer.from_dir(tmp_path)
    good = make_tokenizer_dir(tmp_path / "good")
    (good / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="tokenizer_config.json"):
        Tokenizer.from_dir(good)


@pytest.mark.slow
def test_zaya_does_not_import_transformers():
    code = "import sys, zaya.tokenizer, zaya.chat; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- streaming detokenization -------------------------------------------------------------------


def _stream(tok, ids, skip):
    dec = IncrementalDecoder(tok, skip_special_tokens=skip)
    deltas = [dec.push(i) for i in ids]
    return deltas, dec.flush()


def test_incremental_holds_back_split_emoji(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    ids = tok.encode("ok 😀 done", add_special_tokens=False)
    assert len(ids) > 5  # the emoji is four byte tokens
    deltas, tail = _stream(tok, ids, skip=False)
    assert "".join(deltas) + tail == "ok 😀 done"
    assert all("\ufffd" not in d for d in deltas)
    # a byte run is final only once a non-byte token follows it
    assert any(d.startswith("😀") for d in deltas)


_hyp = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_hyp
@given(ids=st.lists(st.integers(0, 511), max_size=40), skip=st.booleans(), byte_level=st.booleans())
def test_incremental_equals_full_decode_random_ids(tokenizer_dir, byte_level_tokenizer_dir, ids, skip, byte_level):
    tok = _load(byte_level_tokenizer_dir if byte_level else tokenizer_dir)
    deltas, tail = _stream(tok, ids, skip)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


@_hyp
@given(text=st.text(alphabet=st.sampled_from(list("ab ü中😀👍🏽\n<>")) | st.characters(), max_size=30),
       skip=st.booleans(), byte_level=st.booleans())  # fmt: skip
def test_incremental_equals_full_decode_of_text(tokenizer_dir, byte_level_tokenizer_dir, text, skip, byte_level):
    tok = _load(byte_level_tokenizer_dir if byte_level else tokenizer_dir)
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids, skip)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=skip)


_loaded: dict = {}


def _load(path):
    if path not in _loaded:
        _loaded[path] = Tokenizer.from_dir(path)
    return _loaded[path]
