"""A model's one-line description, for banners such as `zaya chat`'s.

A model directory may hold ``about.txt``: one line saying what the model is and can do. The
built-in model ships one (written by ``python -m zaya.tasks install`` from
``zaya.tasks.offtopic.ABOUT``); other checkpoints usually have none.
"""

from __future__ import annotations

from pathlib import Path

ABOUT_FILE = "about.txt"


def model_about(path) -> str | None:
    """The first line of ``path/about.txt``, or None when there is none."""
    file = Path(path) / ABOUT_FILE if path is not None else None
    if file is None or not file.is_file():
        return None
    lines = file.read_text(encoding="utf-8").strip().splitlines()
    return lines[0].strip() if lines else None
