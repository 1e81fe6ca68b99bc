"""Prompt-lookup speculative decoding against plain decoding, alternated in one process.

    python benchmarks/speculative.py                          # every figure (mini shape, bf16)
    python benchmarks/speculative.py --only copy --batches 1 --rounds 3

    copy    greedy decode of a prompt that holds a text and starts repeating it (an edit or copy
            request), batch 1 and batch 8: tokens/s with speculation on over off (targets >= 2x
            at batch 1, >= 1.5x at batch 8), the acceptance rate and tokens per row-forward
    random  random prompts (nothing to copy): the same ratio (target >= 0.97, at most 3% slower)

The mini shape (compare_transformers.py) is built once under ``--dir`` with random weights; a
random model does not follow a copy request, so on the copy prompts what it drafts from is its own
repetitive greedy output and the prompt, and the acceptance it reaches is printed beside each
figure. Each round runs the same requests with speculation off then on (the order alternates
between rounds); the figure is the median ratio, printed with the 1-minute load average. Decode
threads: ``--threads`` (default 1, the setting for shared cores; see docs/performance.md). The last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare_transformers import SHAPES  # noqa: E402 (a sibling script)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def build(shape: str, root: Path) -> Path:
    from zaya.checkpoint import save, state_for_saving
    from zaya.config import ZayaConfig
    from zaya.model import ZayaForCausalLM

    path = root / shape
    if not (path / "config.json").is_file():
        config = ZayaConfig.from_dict({**SHAPES[shape], "max_position_embeddings": 8192, "dtype": "bfloat16",
                                       "bos_token_id": 2, "eos_token_id": 6})
        model = ZayaForCausalLM(config)
        model.init_weights(seed=0)
        save(state_for_saving(model.to(torch.bfloat16)), config, path)
    return path


def prompts(kind: str, batch: int, vocab: int, length: int) -> list[list[int]]:
    """``copy``: a text of ``length`` tokens, then its first third again (the copy has begun);
    ``random``: ``length`` random tokens."""
    out = []
    for b in range(batch):
        g = torch.Generator().manual_seed(1000 * b + length)
        text = torch.randint(10, vocab, (length,), generator=g).tolist()
        out.append([2] + (text + text[:length // 3] if kind == "copy" else text))
    return out


def timed(engine, batch_prompts, new_tokens: int) -> tuple[float, int]:
    from zaya.engine import Request
    from zaya.sampling import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    requests = [Request(p, params, i) for i, p in enumerate(batch_prompts)]
    for r in requests:
        engine.add(r)
    while engine.waiting:  # prefill (and the first token) outside the timed decode
        engine.step()
    start = time.perf_counter()
    tokens = 0
    while engine.active:
        tokens += sum(e.token_id is not None for e in engine.step())
    return time.perf_counter() - start, tokens


def compare(llm, kind: str, batch: int, args) -> dict:
    from zaya.engine import Engine

    engines = {"off": Engine(llm.model, cache=llm.cache, prefix_caching=False),
               "on": Engine(llm.model, cache=llm.cache, prefix_caching=False, speculative=args.k)}
    work = prompts(kind, batch, llm.config.vocab_size, args.prompt_tokens)
    timed(engines["off"], [p[:64] for p in work[:1]], 8)  # warm-up
    ratios, rates, loads = [], {"off": [], "on": []}, []
    for r in range(args.rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")
        speed = {}
        for name in order:
            seconds, tokens = timed(engines[name], work, args.new_tokens)
            speed[name] = tokens / seconds
            rates[name].append(speed[name])
        ratios.append(speed["on"] / speed["off"])
        loads.append(load_avg())
    stats = engines["on"].spec_stats
    out = {"ratio": round(statistics.median(ratios), 3), "off_tok_s": round(statistics.median(rates["off"]), 2),
           "on_tok_s": round(statistics.median(rates["on"]), 2), "acceptance": _round(stats.acceptance),
           "tokens_per_forward": _round(stats.tokens_per_forward), "load": max(loads)}
    print(f"{kind} batch {batch}: {out['off_tok_s']} -> {out['on_tok_s']} tok/s, ratio {out['ratio']} "
          f"(acceptance {out['acceptance']}, {out['tokens_per_forward']} tokens per row-forward; load {out['load']})",
          flush=True)
    return out


def _round(x):
    return None if x is None else round(x, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zaya-spec-bench")
    ap.add_argument("--shape", default="mini", choices=list(SHAPES))
    ap.add_argument("--only", default="copy,random")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--k", type=int, default=8, help="longest draft (default 8)")
    ap.add_argument("--prompt-tokens", type=int, default=192)
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import zaya

    llm = zaya.load(build(args.shape, args.dir))
    result = {"shape": args.shape, "threads": args.threads, "load_at_start": load_avg(), "figures": {}}
    for kind in args.only.split(","):
        for batch in map(int, args.batches.split(",")):
            result["figures"][f"{kind}_b{batch}"] = compare(llm, kind, batch, args)
    result["load_at_end"] = load_avg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
