"""zaya: run, serve, test-time-scale and train ZAYA1 models on stock PyTorch."""

from __future__ import annotations

from zaya.engine import Completion, TokenEvent
from zaya.errors import CheckpointError, ConfigError, ContextLengthError, ZayaError
from zaya.llm import DEFAULT_MODEL, LLM, load, parse_dtype

__version__ = "0.1.0"
__all__ = ["load", "LLM", "Completion", "TokenEvent", "ZayaError", "CheckpointError", "ConfigError",
           "ContextLengthError", "DEFAULT_MODEL", "parse_dtype"]
