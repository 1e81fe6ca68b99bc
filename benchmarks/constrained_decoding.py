"""What constrained decoding costs per token: decode steps under a JSON-schema grammar against the
same steps unconstrained, on the built-in model and on the mini shape, at batch 1 and 8.

    python benchmarks/constrained_decoding.py                          # built-in and mini, batch 1 and 8
    python benchmarks/constrained_decoding.py --models builtin --rounds 3
    python benchmarks/constrained_decoding.py --checkpoints DIR        # where the mini checkpoint is (or goes)

The mini checkpoint is the random one `compare_transformers.py` builds (benchmarks/zaya_side.py);
it has no tokenizer, so the grammar is built from a synthetic Gemma-style vocabulary of its size
(grammar_libraries.synthetic_tokenizer). Each round decodes the same random prompts greedily with
EOS ignored, once free and once under the grammar, in alternating order; the per-token time is
the decode time divided by the tokens decoded (prefill excluded). The grammar (an object holding
an array of free strings) stays open for the whole run, so every step pays for a real mask.
Prints medians and the overhead, then one JSON line. Target: <= 10% at batch 1 and 8.

Two figures, because the end-to-end ratio swings with other jobs on a shared machine: the
end-to-end overhead (constrained / free - 1), and the grammar's own time per token (masking and
accepting, `GuidedSequence.restrict` + `accept`) as a share of a free token's time, with the
mask computation alone beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import zaya  # noqa: E402
from grammar_libraries import synthetic_tokenizer  # noqa: E402
from zaya.engine import Request  # noqa: E402
from zaya import grammar  # noqa: E402
from zaya.grammar import make_guide  # noqa: E402
from zaya.sampling import SamplingParams  # noqa: E402
from zaya_side import CHECKPOINTS, build, prompts, set_threads  # noqa: E402

SCHEMA = {"type": "object", "properties": {"notes": {"type": "array", "items": {"type": "string"}}},
          "required": ["notes"]}


def load(name: str, checkpoints: Path):
    """(llm, tokenizer the grammar uses)."""
    if name == "builtin":
        llm = zaya.load()
        return llm, llm.tokenizer
    llm = zaya.load(build(name, checkpoints)["bf16"], dtype="bf16")
    return llm, llm.tokenizer or synthetic_tokenizer(llm.config.vocab_size)


def decode(llm, guide, batch: int, new_tokens: int, seed: int) -> float:
    """Seconds per decoded token for ``batch`` random prompts of 32 tokens."""
    engine = llm.engine()
    params = SamplingParams.from_kwargs(max_new_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
    params.constraint = guide
    for i, ids in enumerate(prompts(batch, 32, llm.config.vocab_size, seed).tolist()):
        engine.add(Request(ids, params, i))
    engine.step()  # the prefill's first sample and the first forward
    start, steps = time.perf_counter(), 0
    while engine.active:
        engine.step()
        steps += 1
    return (time.perf_counter() - start) / (batch * max(1, steps - 1))


class HookClock:
    """Time spent in the grammar: `GuidedSequence.restrict` and `accept` (all of it), and the
    mask computation inside them. Less sensitive to other jobs than the end-to-end ratio."""

    def __init__(self):
        self.hooks = self.mask = 0.0
        self.tokens = 0
        for method in ("restrict", "accept"):
            setattr(grammar.GuidedSequence, method, self._timed(getattr(grammar.GuidedSequence, method)))
        original = grammar._forbidden

        def forbidden(*a):
            t0 = time.perf_counter()
            try:
                return original(*a)
            finally:
                self.mask += time.perf_counter() - t0
        grammar._forbidden = forbidden

    def _timed(self, fn):
        def wrapper(seq, *a):
            t0 = time.perf_counter()
            try:
                return fn(seq, *a)
            finally:
                self.hooks += time.perf_counter() - t0
                self.tokens += fn.__name__ == "accept"
        return wrapper

    def take(self) -> tuple[float, float]:
        """(grammar, mask) seconds per token since the last call."""
        out = (self.hooks / max(1, self.tokens), self.mask / max(1, self.tokens))
        self.hooks = self.mask = 0.0
        self.tokens = 0
        return out


CLOCK = HookClock()


def measure(name: str, args) -> dict:
    llm, tok = load(name, args.checkpoints)
    vocab = llm.config.vocab_size
    guide = make_guide(tok, vocab, starts_in_reasoning=False, schema=SCHEMA)
    out = {}
    for batch in args.batches:
        decode(llm, guide, batch, 4, 99)  # warm-up: kernels, the grammar's first masks
        CLOCK.take()
        free, bound, hooks = [], [], []
        for r in range(args.rounds):
            runs = [("free", None), ("constrained", guide)]
            for label, g in (runs if r % 2 == 0 else runs[::-1]):
                (free if g is None else bound).append(decode(llm, g, batch, args.new_tokens, args.seed + r))
            hooks.append(CLOCK.take())
        f, c = statistics.median(free), statistics.median(bound)
        spent, mask = (statistics.median(h[i] for h in hooks) for i in (0, 1))
        out[f"b{batch}"] = {"free_ms_per_token": f * 1e3, "constrained_ms_per_token": c * 1e3,
                            "overhead_pct": 100 * (c / f - 1), "grammar_ms_per_token": spent * 1e3,
                            "grammar_pct": 100 * spent / f, "mask_ms_per_token": mask * 1e3, "rounds": args.rounds}
        print(f"{name:8s} batch {batch}: free {f * 1e3:7.2f} ms/token, constrained {c * 1e3:7.2f} ms/token, "
              f"end to end {100 * (c / f - 1):+5.1f}%; grammar {spent * 1e3:.3f} ms/token ({100 * spent / f:.1f}%), "
              f"of which the mask {mask * 1e3:.3f}", flush=True)
    return {"vocab": vocab, **out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="builtin,mini", help="builtin and/or mini")
    ap.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    args = ap.parse_args(argv)
    set_threads(args.threads)
    results = {"threads": torch.get_num_threads(), "load": os.getloadavg()[0], "new_tokens": args.new_tokens}
    for name in args.models.split(","):
        results[name] = measure(name, args)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
