"""`zaya pull / list / rm` and `find_local` on a hand-built huggingface_hub cache (no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zaya import models_store as ms
from zaya.cli import main
from zaya.commands import resolve_model_name
from zaya.errors import ZayaError


def _add_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """Lay a repo out the way the hub does: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{commit[:8]}{i:032d}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch, tiny_model_dir):
    cache = tmp_path / "hub"
    _add_repo(cache, "Zyphra/ZAYA1-tiny", {p.name: p.read_bytes() for p in tiny_model_dir.iterdir()})
    _add_repo(cache, "someone/not-a-model", {"README.md": b"hello"})
    _add_repo(cache, "someone/half", {"config.json": b'{"model_type": "zaya"}',
                                      "model.safetensors.index.json":
                                          json.dumps({"weight_map": {"x": "model-00001.safetensors"}}).encode()})
    monkeypatch.setattr(ms, "default_cache", lambda: cache)
    return cache


def test_list_and_find(cache, capsys):
    models = {m.repo_id: m for m in ms.local_models(cache)}
    tiny = models["Zyphra/ZAYA1-tiny"]
    assert tiny.layout == "native" and tiny.model_type == "zaya" and tiny.size_bytes > 1000
    assert models["someone/half"].layout == "incomplete"
    assert models["someone/not-a-model"].layout == "not a model"
    assert ms.find_local("Zyphra/ZAYA1-tiny") == str(tiny.path)
    assert ms.find_local("zyphra/zaya1-TINY") == ms.find_local("ZAYA1-tiny") == str(tiny.path)
    assert ms.find_local("nothing") is None
    assert resolve_model_name("ZAYA1-tiny") == str(tiny.path)  # --model accepts `zaya list` names
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "Zyphra/ZAYA1-tiny" in out and "native" in out and "not-a-model" not in out
    assert main(["list", "--json", "--all"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 3


def test_rm(cache, capsys):
    assert main(["rm", "ZAYA1-tiny", "--yes"]) == 0
    assert "deleted Zyphra/ZAYA1-tiny" in capsys.readouterr().out
    assert ms.find_local("ZAYA1-tiny") is None and ms.find_local("someone/half")
    assert main(["rm", "ZAYA1-tiny", "--yes"]) == 1  # a ZayaError, printed without a traceback


def test_ambiguous_short_name(cache):
    _add_repo(cache, "other/ZAYA1-tiny", {"config.json": b"{}"})
    with pytest.raises(ZayaError, match="several"):
        ms.find_local("ZAYA1-tiny")
    assert ms.find_local("other/ZAYA1-tiny")


def test_pull_uses_the_hub_cache(cache, monkeypatch, capsys):
    calls = []

    def fake_snapshot_download(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(ms.find_local("Zyphra/ZAYA1-tiny"))

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert main(["pull", "Zyphra/ZAYA1-tiny", "--revision", "v1"]) == 0
    assert calls[0][0] == "Zyphra/ZAYA1-tiny" and calls[0][1]["revision"] == "v1"
    assert "*.safetensors" in calls[0][1]["allow_patterns"]
    assert "native layout" in capsys.readouterr().out
