"""zaya.chat: templates (transformers' apply_chat_template as the oracle), reasoning split, tool calls."""

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.tiny_model import make_tiny_model
from tests.tiny_tokenizer import make_tokenizer_dir

from zaya.chat import (
    DEFAULT_CHAT_TEMPLATE,
    ReasoningParser,
    ToolCallStreamer,
    generation_starts_in_reasoning,
    parse_assistant,
    parse_tool_calls,
    render_chat,
    split_reasoning,
)
from zaya.errors import ZayaError
from zaya.llm import LLM
from zaya.tokenizer import Tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city, in °C",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "scale": {"type": "number"},
                "hourly": {"type": "boolean"},
                "fields": {"type": "array"},
                "opts": {"type": "object"},
                "zip": {"type": ["string", "null"]},
            },
        },
    },
}

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "reasoning_content": "Need the tool.", "content": None,
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "c2", "content": "sunny"},
    {"role": "assistant", "reasoning": "It is warm.", "content": "21 °C and sunny."},
]  # fmt: skip

# -- templates --------------------------------------------------------------------------------


def test_default_template_simple_turns():
    msgs = [{"role": "user", "content": "Hi"}]
    head = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, msgs) == head + "<think>\n"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, msgs, enable_thinking=True) == head + "<think>\n"
    assert render_chat(DEFAULT_CHAT_TEMPLATE, msgs, enable_thinking=False) == head + "<think>\n\n</think>\n\n"
    assert (
        render_chat(DEFAULT_CHAT_TEMPLATE, msgs, add_generation_prompt=False) == head[: -len("<start_of_turn>model\n")]
    )


def test_default_template_full_conversation():
    text = render_chat(DEFAULT_CHAT_TEMPLATE, CONVERSATION, tools=[WEATHER])
    assert text.startswith("<bos><start_of_turn>system\nBe brief.\n\n# Tools\n")
    assert json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text  # non-ASCII kept
    assert (
        "<start_of_turn>user\nWeather in Paris?<end_of_turn>\n"
        "<start_of_turn>model\n<think>\nNeed the tool.\n</think>\n\n"
        "<zyphra_tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
        "<parameter=days>\n2\n</parameter>\n</function>\n</zyphra_tool_call><end_of_turn>\n"
        '<start_of_turn>tool\n<zyphra_tool_response>\n{"temp": 21}\n</zyphra_tool_response>\n'
        "<zyphra_tool_response>\nsunny\n</zyphra_tool_response><end_of_turn>\n"
        "<start_of_turn>model\n<think>\nIt is warm.\n</think>\n\n21 °C and sunny.<end_of_turn>\n"
        "<start_of_turn>model\n<think>\n"
    ) in text
    assert text.count("<start_of_turn>system") == 1


def test_default_template_drops_reasoning_before_last_user():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": "r"},
            {"role": "user", "content": "c"}]  # fmt: skip
    text = render_chat(DEFAULT_CHAT_TEMPLATE, msgs, enable_thinking=False)
    assert "<think>\nr" not in text and "<start_of_turn>model\nb<end_of_turn>\n" in text


def test_default_template_round_trips_tool_calls():
    args = {"city": "São Paulo", "days": 3, "hourly": True, "fields": ["t", "rain"], "opts": {"a": 1}}
    msg = {"role": "assistant", "content": "Checking.",
           "tool_calls": [{"function": {"name": "get_weather", "arguments": args}}]}  # fmt: skip
    text = render_chat(DEFAULT_CHAT_TEMPLATE, [msg], add_generation_prompt=False, bos_token=None)
    body = text.removeprefix("<start_of_turn>model\n").removesuffix("<end_of_turn>\n")
    content, calls = parse_tool_calls(body, [WEATHER])
    assert content == "Checking."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", args)]


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """A tokenizer directory whose tokenizer_config.json carries an HF-style (Qwen3-like) template."""
    transformers = pytest.importorskip("transformers")
    path = make_tokenizer_dir(tmp_path_factory.mktemp("tpl"), chat_template=HF_STYLE_TEMPLATE)
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(str(path))


HF_STYLE_TEMPLATE = """{{ bos_token }}{% if tools %}<|sys|>Tools:
{% for t in tools %}{{ t | tojson }}
{% endfor %}Date: {{ strftime_now('%Y') | length }}<|end|>
{% endif %}{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}
{% if m.role not in ['system', 'user', 'assistant', 'tool'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}
<|{{ m.role }}|>{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>{% endif %}
{% generation %}{{ m.content if m.content is string else '' }}{% endgeneration %}
{% for c in m.tool_calls or [] %}{% if loop.index > 3 %}{% break %}{% endif %}
<call>{{ c.function.name }} {{ c.function.arguments | tojson }}</call>{% endfor %}<|end|>
{% endfor %}{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}
<think></think>{% endif %}{% endif %}{{ eos_token if ns.n > 100 else '' }}"""


@pytest.mark.parametrize("enable_thinking", [None, True, False])
@pytest.mark.parametrize("with_tools", [False, True])
@pytest.mark.parametrize("which", ["default", "hf_style"])
def test_render_matches_transformers(hf_pair, enable_thinking, with_tools, which):
    ours, ref = hf_pair
    template = DEFAULT_CHAT_TEMPLATE if which == "default" else ours.chat_template
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    tools = [WEATHER] if with_tools else None
    # transformers wants dict arguments; render_chat also accepts OpenAI's JSON strings (below)
    hf_conversation = copy.deepcopy(CONVERSATION)
    hf_conversation[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 2}
    expected = ref.apply_chat_template(hf_conversation, tools=tools, chat_template=template, tokenize=False,
                                       add_generation_prompt=True, **kwargs)  # fmt: skip
    got = render_chat(template, CONVERSATION, tools=tools, enable_thinking=enable_thinking, **ours.special_tokens)
    assert got == expected


def test_llm_picks_the_tool_use_template_when_tools_are_given(tmp_path):
    """A checkpoint with named templates: "tool_use" when tools are passed, else "default" (as
    transformers chooses, with the tokenizer's own bos/eos tokens); without a template of its
    own, zaya's default serves both."""
    transformers = pytest.importorskip("transformers")
    named = [{"name": "default", "template": "{{ bos_token }}D:{{ messages[0].content }}{{ eos_token }}"},
             {"name": "tool_use",
              "template": "{{ bos_token }}T:{{ tools[0].function.name }}:{{ messages[0].content }}"}]
    path = make_tokenizer_dir(tmp_path / "named", chat_template=named)
    llm, ref = LLM(make_tiny_model(), Tokenizer.from_dir(path)), transformers.AutoTokenizer.from_pretrained(str(path))
    messages = [{"role": "user", "content": "hi"}]
    for tools in (None, [WEATHER]):
        got = llm.render_chat(messages, tools=tools)
        assert got == ref.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        assert got == ("<bos>T:get_weather:hi" if tools else "<bos>D:hi<end_of_turn>")
    assert llm.apply_chat_template(messages, tools=[WEATHER]) == llm.tokenizer.encode("<bos>T:get_weather:hi",
                                                                                     add_special_tokens=False)
    plain = LLM(make_tiny_model(), Tokenizer.from_dir(make_tokenizer_dir(tmp_path / "plain")))
    assert plain.chat_template([WEATHER]) == plain.chat_template() == DEFAULT_CHAT_TEMPLATE


def test_json_string_arguments_become_dicts():
    as_string = render_chat(DEFAULT_CHAT_TEMPLATE, CONVERSATION)
    as_dict = copy.deepcopy(CONVERSATION)
    as_dict[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 2}
    assert render_chat(DEFAULT_CHAT_TEMPLATE, as_dict) == as_string
    assert CONVERSATION[2]["tool_calls"][0]["function"]["arguments"].startswith("{")  # caller's copy untouched


def test_template_errors_become_zaya_errors():
    with pytest.raises(ZayaError, match="unknown message role: robot"):
        render_chat(DEFAULT_CHAT_TEMPLATE, [{"role": "robot", "content": "x"}])
    with pytest.raises(ZayaError, match="chat template error"):
        render_chat("{% if %}", [])
    with pytest.raises(ZayaError, match="custom failure"):
        render_chat("{{ raise_exception('custom failure') }}", [])


def test_template_helpers():
    out = render_chat("{{ messages[0].content | tojson }}|{{ enable_thinking is defined }}|{{ x }}",
                      [{"role": "user", "content": [{"type": "text", "text": "né "}, {"type": "text", "text": "😀"}]}],
                      x=3)  # fmt: skip
    assert out == '"né 😀"|False|3'


def test_generation_starts_in_reasoning():
    assert generation_starts_in_reasoning("<start_of_turn>model\n<think>\n")
    assert not generation_starts_in_reasoning("<start_of_turn>model\n<think>\n\n</think>\n\n")
    assert not generation_starts_in_reasoning("plain prompt")
    assert generation_starts_in_reasoning("<think>a</think> b <think>")


# -- reasoning ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,started,expected",
    [
        ("Let me see.\n</think>\n\nThe answer is 4.", True, ("Let me see.", "The answer is 4.")),
        ("still thinking, out of tokens", True, ("still thinking, out of tokens", "")),
        ("<think>\nhmm\n</think>\n\nok", False, ("hmm", "ok")),
        ("<think>\nhmm", False, ("hmm", "")),
        ("just an answer\n", False, (None, "just an answer")),
        ("\n\n</think>\n\nok", True, (None, "ok")),
        ("<think>again\n</think>ok", True, ("again", "ok")),
        ("pre <think>r</think> post", False, ("r", "pre  post")),
        ("a</think>b</think>c", True, ("a", "b</think>c")),
    ],
)
def test_split_reasoning(text, started, expected):
    assert split_reasoning(text, started) == expected


_pieces = st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think>", "\n", " ", "a", "b c", "é😀"])
_texts = st.lists(_pieces | st.text(max_size=3), max_size=12).map("".join)


@st.composite
def _split(draw, text):
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=8)))
    return [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=_texts, started=st.booleans())
def test_streaming_reasoning_equals_split(data, text, started):
    parser = ReasoningParser(started)
    reasoning, content = [], []
    for delta in data.draw(_split(text)):
        r, c = parser.feed(delta)
        reasoning.append(r)
        content.append(c)
    r, c = parser.flush()
    expected_reasoning, expected_content = split_reasoning(text, started)
    assert "".join(reasoning) + r == (expected_reasoning or "")
    assert "".join(content) + c == expected_content


# -- tool calls ---------------------------------------------------------------------------------


def _call(name, params):
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    return f"<zyphra_tool_call>\n<function={name}>\n{body}</function>\n</zyphra_tool_call>"


def test_parse_typed_by_schema():
    text = "Sure.\n" + _call("get_weather", {"city": "123", "days": "2", "scale": "1.5", "hourly": "true",
                                             "fields": '["a", "b"]', "opts": '{"k": null}', "zip": "null"})  # fmt: skip
    content, calls = parse_tool_calls(text, [WEATHER])
    assert content == "Sure."
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].id.startswith("call_")
    assert calls[0].arguments == {"city": "123", "days": 2, "scale": 1.5, "hourly": True,
                                  "fields": ["a", "b"], "opts": {"k": None}, "zip": None}  # fmt: skip


def test_parse_values_that_do_not_fit_schema_stay_strings():
    _, calls = parse_tool_calls(_call("get_weather", {"days": "two", "hourly": "True", "opts": "[1]"}), [WEATHER])
    assert calls[0].arguments == {"days": "two", "hourly": True, "opts": "[1]"}


def test_parse_without_schema_and_newline_handling():
    text = "<zyphra_tool_call><function=f><parameter=n>42</parameter><parameter=s>\n\nhi\n\n</parameter>"
    text += '<parameter=j>{"a": [1]}</parameter><parameter=t>not json</parameter></function></zyphra_tool_call>'
    _, calls = parse_tool_calls(text)
    assert calls[0].arguments == {"n": 42, "s": "\nhi\n", "j": {"a": [1]}, "t": "not json"}
    assert json.loads(calls[0].arguments_json) == calls[0].arguments


def test_parse_multiple_and_json_bodies():
    text = (
        "A" + _call("f", {"x": "1"}) + "\nB\n"
        '<zyphra_tool_call>{"name": "g", "arguments": {"y": "é"}}</zyphra_tool_call>'
        '<zyphra_tool_call>\n{"name": "h", "arguments": "{\\"z\\": 3}"}\n</zyphra_tool_call>'
    )
    content, calls = parse_tool_calls(text)
    assert content == "A\nB"
    assert [(c.name, c.arguments) for c in calls] == [("f", {"x": 1}), ("g", {"y": "é"}), ("h", {"z": 3})]
    assert "é" in calls[1].arguments_json  # not \u-escaped


@pytest.mark.parametrize(
    "text",
    [
        "<zyphra_tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n</function>\n",  # unterminated
        "<zyphra_tool_call>no function here</zyphra_tool_call>",
        '<zyphra_tool_call>{"name": "f", "arguments": [1]}</zyphra_tool_call>',
        "<zyphra_tool_call>{broken json</zyphra_tool_call>",
        "text <zyphra_tool",
    ],
)
def test_malformed_calls_stay_content(text):
    assert parse_tool_calls(text) == (text.strip(), [])


def test_parse_assistant_combines_both():
    text = "I could call <zyphra_tool_call>x</zyphra_tool_call>\n</think>\n\n" + _call("get_weather", {"days": "1"})
    result = parse_assistant(text, started_in_reasoning=True, tools=[WEATHER])
    assert result.reasoning.startswith("I could call")
    assert result.content == ""
    assert [(c.name, c.arguments) for c in result.tool_calls] == [("get_weather", {"days": 1})]
    plain = parse_assistant("<think>\n\n</think>\n\nHello", started_in_reasoning=False)
    assert (plain.reasoning, plain.content, plain.tool_calls, plain.completion) == (None, "Hello", [], None)


_tool_texts = st.lists(
    st.sampled_from(["Hi ", "\n", " ", "<zyphra_", "<zyphra_tool_call>", _call("f", {"a": "1"}), "tail", "é"]),
    max_size=8,
).map("".join)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=_tool_texts)
def test_tool_call_streamer_matches_parse(data, text):
    streamer = ToolCallStreamer()
    shown = "".join(streamer.feed(d) for d in data.draw(_split(text)))
    tail, calls = streamer.finish()
    content, expected_calls = parse_tool_calls(text)
    assert "<zyphra_tool_call>" not in shown
    assert shown + tail == content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in expected_calls]
