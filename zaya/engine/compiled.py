"""Decode steps through ``torch.compile``: each layer's two fixed-shape halves as compiled graphs.

A batch-1 decode step on a CPU is mostly the cost of issuing ~2,000 small operators from Python
(docs/performance.md). Every layer's work outside the cache and the attention
(``ZayaDecoderLayer.attention_in`` / ``attention_out``: norms, projections, CCA conv and mixing,
RoPE, residual scaling, the router MLP and the experts) has the same shapes at every step of a
given batch size, so Inductor can compile each half once per batch size into fused C++ loops
(the kernels' ``zaya::mv_*`` operators stay calls: they have fake implementations). The cache
update and attention, whose key length grows every step, stay eager.

Whether it is used is the ``compile`` setting of `zaya.load` / `LLM` / `Engine` (``--compile`` on
the command line): ``"on"``, ``"off"`` or ``"auto"``; unset, ``ZAYA_COMPILE`` decides, and without
it ``"auto"`` (`resolve`). ``"auto"`` is a table per device type (`AUTO`), filled from
measurements: eager on CPU, where the compiled step measured level with eager at batch 1 and
below it at batch 2 (docs/performance.md, "Compiled decode step"), and eager on CUDA, where it has
not been measured; `decide` says which and why.

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
from dataclasses import dataclass
from pathlib import Path

import torch

from zaya.errors import ZayaError
from zaya.kernels.build import user_cache_dir

HALVES = ("attention_in", "attention_out")
MODES = ("auto", "on", "off")
MODES_HELP = ("compiled decode step: on, off, or auto (the default: what measured faster on this device "
              "type, today eager on CPU and CUDA); unset, $ZAYA_COMPILE decides")
_ENV_VALUES = {"": "auto", "auto": "auto", "1": "on", "on": "on", "0": "off", "off": "off"}

# What "auto" picks per device type, and why (docs/performance.md, "Compiled decode step").
# A device type not listed (CUDA among them, not measured yet) runs eager: nothing is turned on
# that has not measured faster.
AUTO: dict[str, tuple[bool, str]] = {
    "cpu": (False, "on CPU the compiled step measured 0.93-1.00x of eager at batch 1 and 0.85x at batch 2, "
                   "its 1.09-1.23x at batch 4-8 shrank to 1.03x under load, and every new batch size costs "
                   "a 12-20 s compile"),
}


def resolve(setting: str | None = None) -> str:
    """The compile mode in force: ``setting`` when given (``--compile``, ``compile=``), else
    ``ZAYA_COMPILE`` (0/off, 1/on, auto), else ``"auto"``."""
    if setting is not None:
        if setting not in MODES:
            raise ZayaError(f"compile must be one of {', '.join(MODES)} (--compile), got {setting!r}")
        return setting
    value = os.environ.get("ZAYA_COMPILE", "").strip().lower()
    if value not in _ENV_VALUES:
        raise ZayaError(f"ZAYA_COMPILE must be 0/off, 1/on or auto, got {value!r}")
    return _ENV_VALUES[value]


@dataclass(frozen=True)
class Decision:
    """Whether decode steps run compiled: ``mode`` is the setting in force, ``source`` where it
    came from (``"compile="``, ``"ZAYA_COMPILE"`` or ``"default"``), ``on`` the outcome and
    ``reason`` why, for ``"auto"``."""

    mode: str
    source: str
    on: bool
    reason: str = ""

    def __str__(self) -> str:
        step = "compiled" if self.on else "eager"
        said = {"compile=": f"compile {self.mode}", "ZAYA_COMPILE": f"ZAYA_COMPILE={self.mode}"}.get(
            self.source, f"compile {self.mode}, the default")
        return f"{step} ({said}{': ' + self.reason if self.reason else ''})"


def decide(setting: str | None, device) -> Decision:
    """`resolve` the setting, and for ``"auto"`` look the device type up in `AUTO`."""
    mode = resolve(setting)
    source = "compile=" if setting is not None else "ZAYA_COMPILE" if os.environ.get("ZAYA_COMPILE", "").strip() \
        else "default"
    if mode != "auto":
        return Decision(mode, source, mode == "on")
    kind = torch.device(device).type
    on, why = AUTO.get(kind, (False, f"on {kind} the compiled step has not been measured"))
    return Decision(mode, source, on, why)


def apply(model, setting: str | None = None, device=None) -> Decision:
    """Decide for ``model`` (on its parameters' device unless given) and wrap its layers when the
    answer is on. "off" leaves a model that is already wrapped as it is."""
    decision = decide(setting, device if device is not None else next(model.parameters()).device)
    if decision.on:
        compile_decode(model, backend=BACKEND)
    return decision


def is_compiled(model) -> bool:
    """Whether the model's layers go through compiled halves (until a failure makes them eager)."""
    return any(isinstance(layer.__dict__.get(h), _CompiledHalf) for layer in model.model.layers for h in HALVES)


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


BACKEND = "inductor"  # torch.compile's backend for `apply` (tests put one that fails here)


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
