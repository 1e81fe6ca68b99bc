"""Fixtures shared by the test modules.

Checkpoints and tokenizers are written once per session into temporary directories and are
read-only for the tests that use them; a test that changes files builds its own with the helpers
in ``tests.tiny_model``, ``tests.tiny_tokenizer`` and ``tests.tiny_train``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny_model import make_tiny_model_dir
from tests.tiny_tokenizer import make_tokenizer_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The default tiny random checkpoint (``make_tiny_model_dir`` with seed 0) with its tokenizer."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The default tiny tokenizer: Gemma style, vocab 512, bos and eos added."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def byte_level_tokenizer_dir(tmp_path_factory) -> Path:
    """The tiny tokenizer in its GPT-2 byte-level style."""
    return make_tokenizer_dir(tmp_path_factory.mktemp("bytelevel"), byte_level=True)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One intra-op torch thread for the whole session, then the setting as it was.

    Tiny models gain nothing from more threads, and on a shared machine idle OpenMP threads spin
    and wait for a core: one thread keeps the suite fast and its numbers repeatable, and leaves a
    core for a live server's clients."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
