"""Decode steps through ``torch.compile``: each layer's two fixed-shape halves as compiled graphs.

A batch-1 decode step on a CPU is mostly the cost of issuing ~2,000 small operators from Python
(docs/performance.md). Every layer's work outside the cache and the attention
(``ZayaDecoderLayer.attention_in`` / ``attention_out``: norms, projections, CCA conv and mixing,
RoPE, residual scaling, the router MLP and the experts) has the same shapes at every step of a
given batch size, so Inductor can compile each half once per batch size into fused C++ loops
(the kernels' ``zaya::mv_*`` operators stay calls: they have fake implementations). The cache
update and attention, whose key length grows every step, stay eager.

Opt-in: ``ZAYA_COMPILE=1`` (the engine calls `compile_decode`); measured on this project's
CPU it is not faster yet (docs/performance.md, "Compiled decode step"), so it is off by default.
Compiled graphs are cached on disk by Inductor's FX graph cache under ``$ZAYA_COMPILE_CACHE``
(default ``$XDG_CACHE_HOME/zaya/inductor`` or ``~/.cache/zaya/inductor``), keyed by the graph,
its shapes and dtypes and the torch version, so a later start loads them instead of compiling.
When compiling fails (no C++ compiler, an operator Inductor cannot take), the layer warns once
and runs eager from then on; eager is also what runs for prefill chunks (S > 1) and for batch
sizes above ``ZAYA_COMPILE_MAX_BATCH`` (default 8), each of which would be another compile.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from zaya.kernels.build import user_cache_dir

HALVES = ("attention_in", "attention_out")


def enabled() -> bool:
    """Whether ``ZAYA_COMPILE`` asks for compiled decode steps."""
    value = os.environ.get("ZAYA_COMPILE", "0").strip().lower()
    if value not in ("0", "1", "off", "on", ""):
        raise ValueError(f"ZAYA_COMPILE must be 0/off or 1/on, got {value!r}")
    return value in ("1", "on")


def cache_dir() -> Path:
    return user_cache_dir("inductor", "ZAYA_COMPILE_CACHE")


def max_batch() -> int:
    return int(os.environ.get("ZAYA_COMPILE_MAX_BATCH", "8") or 8)


class _CompiledHalf:
    """One layer half: the compiled function for decode rows, the eager one otherwise or once
    compiling has failed for any half of the model (``failures``, shared: one failure is enough
    to know the rest would fail too, and each attempt costs a compile)."""

    def __init__(self, eager, name: str, backend, options: dict | None, failures: list[str]):
        self.eager, self.name, self.failures = eager, name, failures
        self.compiled = torch.compile(eager, backend=backend, options=options, dynamic=False, fullgraph=False)

    def __call__(self, x: torch.Tensor, *args):
        # x is the residual h (B, S, H) or the attention output o (B, Hq, S, D): decode rows have S == 1
        rows, S = x.shape[0], x.shape[-2] if x.dim() == 4 else x.shape[1]
        if self.failures or S != 1 or rows > max_batch() or args[0] is None:
            return self.eager(x, *args)
        try:
            return self.compiled(x, *args)
        except Exception as e:  # any failure to compile or run the graph: eager gives the same numbers
            why = " ".join(f"{type(e).__name__}: {e}".split())[:400]
            self.failures.append(f"{self.name}: {why}")
            warnings.warn(f"zaya: compiling {self.name} failed ({why}); decode steps run eager", RuntimeWarning)
            return self.eager(x, *args)


def compile_decode(model, *, backend="inductor", options: dict | None = None) -> int:
    """Route every decoder layer's two halves through `torch.compile` for decode rows; returns how
    many halves were wrapped (0 when the model already is). Nothing compiles until the first step.
    ``backend`` / ``options`` are ``torch.compile``'s (tests pass a backend that fails)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir())  # torch may have set its default already
    wrapped, failures = 0, []
    for i, layer in enumerate(model.model.layers):
        for half in HALVES:
            if isinstance(layer.__dict__.get(half), _CompiledHalf):
                continue
            setattr(layer, half, _CompiledHalf(getattr(layer, half), f"layer {i} {half}", backend, options, failures))
            wrapped += 1
    return wrapped


def compile_failures(model) -> list[str]:
    """Why the model's decode steps fell back to eager (empty while they run compiled)."""
    halves = [h for layer in model.model.layers for h in (layer.__dict__.get(n) for n in HALVES)
              if isinstance(h, _CompiledHalf)]
    return list(halves[0].failures) if halves else []
