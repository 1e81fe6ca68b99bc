"""The `zaya` command: help for every subcommand, generate, info."""

from __future__ import annotations

import json

import pytest

from tiny_model import make_tiny_model_dir
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


def test_generate_streams_text(tmp_path, capsys):
    path = make_tiny_model_dir(tmp_path / "m")
    assert main(["generate", "Hello", "--model", str(path), "--max-new-tokens", "5", "-t", "0", "--raw"]) == 0
    captured = capsys.readouterr()
    assert "5 tokens" in captured.err or "finish: stop" in captured.err


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


def test_chat_banner_says_what_the_builtin_model_does(tmp_path, monkeypatch, capsys):
    import zaya
    from zaya.about import model_about

    def no_input(prompt=""):
        raise EOFError

    monkeypatch.setattr("builtins.input", no_input)
    assert main(["chat"]) == 0
    banner = capsys.readouterr().err.splitlines()
    assert banner[1] == model_about(zaya.DEFAULT_MODEL) and "whole numbers 0-99" in banner[1]
    path = make_tiny_model_dir(tmp_path / "m")                   # a model without about.txt: no such line
    assert main(["chat", "--model", str(path)]) == 0
    assert len(capsys.readouterr().err.splitlines()) == 1
