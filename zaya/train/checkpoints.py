"""Crash-safe training checkpoints in the inference format.

``OUT/checkpoints/step-0000100/`` is a normal model directory (config.json, model.safetensors,
tokenizer files) that ``zaya.load`` and transformers read as is, plus ``trainer_state.pt`` with
what resuming needs: optimizer moments, the balance controller, the step (which fixes the LR and
the data position), RNG states and a fingerprint of the data. Weights are saved in fp32, the
precision they train in, so a resumed run continues bit for bit.

A checkpoint is written into ``.tmp-step-...``, every file and the directory are fsynced, and
only then renamed to ``step-...``: a directory with that name is always complete, whatever
moment a crash or kill strikes. Older checkpoints are pruned only after the new one is in place.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from zaya.checkpoint import save, state_for_saving, tokenizer_files

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"step-(\d+)")


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def complete_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints, oldest first."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _NAME.fullmatch(path.name)
        if m and (path / STATE_FILE).is_file() and (path / "config.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = complete_checkpoints(out_dir)
    return found[-1][1] if found else None


def write_checkpoint(out_dir: Path, step: int, model, trainer_state: dict, *, tokenizer_dir: Path | None,
                     chat_template: str | None = None, keep: int = 2) -> Path:
    """Write atomically; returns the checkpoint's directory (call on one rank only)."""
    root = checkpoint_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    extra = tokenizer_files(tokenizer_dir) if tokenizer_dir else []
    state = {k: v.float() if v.is_floating_point() else v for k, v in state_for_saving(model).items()}
    save({k: v.cpu() for k, v in state.items()}, model.config, tmp, extra_files=extra)
    if chat_template is not None:  # the template the data was rendered with, so inference matches it
        (tmp / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    torch.save(trainer_state, tmp / STATE_FILE)
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    if final.exists():  # the same step written again (e.g. a run restarted with a new config)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync(root)
    for _, path in complete_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def read_trainer_state(path: Path) -> dict:
    # plain tensors, numbers and dicts only: never unpickle arbitrary objects
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def remove_partial(out_dir: Path) -> None:
    """Clean up after a crash during a write: unfinished copies go, a displaced complete one returns."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for path in root.iterdir():
        if path.name.startswith(".old-") and path.is_dir():
            # a crash between the two renames of a rewrite: the old copy is the complete one
            name = path.name[len(".old-"):].rsplit("-", 1)[0]
            if not (root / name).exists():
                os.rename(path, root / name)
                continue
        if path.name.startswith((".tmp-", ".old-")) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    import random

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
