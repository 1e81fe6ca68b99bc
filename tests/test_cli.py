"""The `zaya` command: help for every subcommand, generate, info."""

from __future__ import annotations

import io
import json

import pytest

import zaya
from tests.tiny_model import make_tiny_model_dir
from zaya.about import model_about
from zaya.cli import build_parser, main


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"generate", "chat", "convert", "info"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert "usage: zaya " + name in capsys.readouterr().out


def test_generate_streams_text(tiny_model_dir, capsys):
    llm = zaya.load(tiny_model_dir)
    chat = llm.apply_chat_template([{"role": "user", "content": "Hello"}])
    for flags, prompt in ((["--raw"], "Hello"), ([], chat)):
        assert main(["generate", "Hello", "--model", str(tiny_model_dir), "--max-new-tokens", "5", "-t", "0",
                     *flags]) == 0
        want = llm.generate(prompt, max_new_tokens=5, temperature=0)[0]
        captured = capsys.readouterr()
        assert want.text and captured.out == want.text + "\n", flags
        assert f"[{len(want.token_ids)} tokens in " in captured.err and f"finish: {want.finish_reason}]" in captured.err


def test_info_reports_params_and_skip_audit(tmp_path, capsys):
    path = make_tiny_model_dir(tmp_path / "reachable", tokenizer=False, skip_bias=0.5)
    assert main(["info", "--model", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    p = report["parameters"]
    assert p["active_per_token"] < p["non_embedding"] < p["total"]
    assert report["kv_bytes_per_token"] == 3 * 2 * 2 * 16 * 4
    assert len(report["skip_audit"]) == 3 and all(a["skip_reachable"] for a in report["skip_audit"])
    path = make_tiny_model_dir(tmp_path / "unreachable", tokenizer=False, skip_bias=-1.5)
    assert main(["info", "--model", str(path)]) == 0
    assert "unreachable in every layer" in capsys.readouterr().out


def test_clear_error_without_traceback(tmp_path, capsys):
    assert main(["info", "--model", str(tmp_path)]) == 1
    assert "config.json is missing" in capsys.readouterr().err


def test_generate_json_schema_and_thinking_budget(tmp_path, capsys):
    """The built-in model under --json-schema (inline or a file) answers valid JSON after its reasoning."""
    schema = {"type": "object", "properties": {"result": {"type": "integer", "minimum": 0, "maximum": 999}},
              "required": ["result"], "additionalProperties": False}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    prompt = "Start with 6, then apply +5 in order. What is the result?"
    for flag in (json.dumps(schema), str(path)):
        assert main(["generate", prompt, "--json-schema", flag, "--thinking-budget", "20", "-t", "0",
                     "--max-new-tokens", "80"]) == 0
        out = capsys.readouterr().out
        assert "finish" not in out and json.loads(out.rsplit("</think>", 1)[1])["result"] >= 0
    assert main(["generate", prompt, "--json-schema", "{not json"]) == 1
    assert "--json-schema is not valid JSON" in capsys.readouterr().err
    assert main(["generate", prompt, "--json-schema", '{"type": "nope"}']) == 1
    assert "schema" in capsys.readouterr().err


def test_chat_banner_says_what_the_builtin_model_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # input() meets end of input at once: Ctrl-D
    assert main(["chat"]) == 0
    banner = capsys.readouterr().err
    assert model_about(zaya.DEFAULT_MODEL) in banner and "whole numbers 0-99" in banner
    path = make_tiny_model_dir(tmp_path / "m")                   # a model without about.txt: its config instead
    assert main(["chat", "--model", str(path)]) == 0
    banner = capsys.readouterr().err
    assert "whole numbers" not in banner and "ZAYA1-architecture model" in banner
