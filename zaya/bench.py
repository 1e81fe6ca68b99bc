"""`zaya bench`: decode and prefill speed against the machine's own memory bandwidth.

Decode at batch 1 streams every active weight once per token (attention, router, the chosen
expert, the LM head), so ``tok/s * bytes_per_token`` is the bandwidth the run achieved and its
ratio to a bandwidth measured in the same run is the model-bandwidth utilisation (MBU). The
last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import torch

from zaya.commands import add_model_args, resolve_model_name
from zaya.engine import Engine, PagedCache, Request, SpecStats, compiled
from zaya.engine.cache import state_bytes
from zaya.engine.runner import ForwardBatch, forward
from zaya.llm import load
from zaya.sampling import SamplingParams

TEXT = ("The river rose through the night and by morning the low fields were water. People carried what they "
        "could to the church on the hill, and the miller counted boats. Rain is measured in millimetres, but "
        "a flood is measured in the things it takes: fences, stores of grain, the road to the market town. "
        "When the water went down, the silt it left was rich, and the next harvest was the best in years.")


def peak_rss() -> int:
    """Peak resident set size of this process, in bytes.

    Linux's VmHWM first: ``ru_maxrss`` survives exec, so a child started by a big parent would
    report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def measure_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Best-of read bandwidth (bytes/s) of a reduction over a buffer much larger than the caches."""
    x = torch.ones(mbytes * (1 << 20) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads: everything but the unchosen experts and the
    embedding table (a lookup reads one row; a tied head is counted once, as the head)."""
    seen, total = set(), 0
    E = model.config.num_experts
    untied = not model.config.tie_word_embeddings
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if ".mlp.experts." in name:
            nbytes //= E
        elif untied and name.startswith("model.embed_tokens."):
            nbytes = 0
        total += nbytes
    return total


def _engine(model, cache: PagedCache | None = None, speculative: int = 0, stats=None, compile: str | None = None):
    return Engine(model, None, cache=cache, prefix_caching=False, speculative=speculative, stats=stats,
                  compile=compile)


def decode_rate(model, batch: int, prompt_len: int = 32, new_tokens: int = 64, seed: int = 0,
                cache: PagedCache | None = None, speculative: int = 0, stats=None, compile: str | None = None) -> float:
    """Summed decode tok/s over ``batch`` rows (prefill excluded), greedy, EOS ignored; ``cache``
    is the paged cache to run in (default: a new one with the default budget); ``speculative``:
    prompt-lookup drafts of up to that many tokens (decode work goes to ``stats``); ``compile``:
    the engine's compile setting (zaya.engine.compiled)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    engine = _engine(model, cache, speculative, stats, compile)
    params = SamplingParams.from_kwargs(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add(Request(torch.randint(3, V, (prompt_len,), generator=g).tolist(), params, i))
    while engine.waiting:  # prefill steps (each ends by sampling the first tokens)
        engine.step()
    t, tokens = time.perf_counter(), 0
    while engine.active:  # each step: one decode (or verify) forward for every row, then sampling
        tokens += sum(e.token_id is not None for e in engine.step())
    return max(1, tokens) / (time.perf_counter() - t)


def prefill_rate(model, tokens: int = 512, seed: int = 0, cache: PagedCache | None = None) -> float:
    ids = torch.randint(3, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    cache = _engine(model, cache).cache
    seq = cache.open(ids[0].tolist())
    cache.reserve(seq, tokens)
    with torch.inference_mode():
        t = time.perf_counter()
        forward(model, ForwardBatch(cache, [seq], tokens), ids.to(cache.device))
        elapsed = time.perf_counter() - t
    cache.close(seq)
    return tokens / elapsed


def speed(model, *, prefill_tokens=512, new_tokens=64, batches=(1, 8), bandwidth=None, rounds=3,
          cache: PagedCache | None = None, speculative: int = 0, compile: str | None = None) -> dict:
    bandwidth = bandwidth or measure_bandwidth()
    engine = _engine(model, cache, compile=compile)  # decides (and wraps the layers) once
    cache = engine.cache  # one pool for every run, as a server has
    for b in batches:  # warm-up (allocator, lazy kernels, and when compiled a compile per batch size)
        decode_rate(model, b, new_tokens=2, cache=cache, compile=compile)
    out = {"prefill_tokens": prefill_tokens,
           "prefill_tok_s": statistics.median(prefill_rate(model, prefill_tokens, s, cache) for s in range(rounds))}
    stats = SpecStats()
    for b in batches:
        out[f"decode_b{b}_tok_s"] = statistics.median(
            decode_rate(model, b, new_tokens=new_tokens, seed=s, cache=cache, speculative=speculative, stats=stats,
                        compile=compile)
            for s in range(rounds))
    if speculative:
        out.update(speculative=speculative, draft_acceptance=stats.acceptance, tokens_per_forward=stats.tokens_per_forward)
    per_token = weight_bytes_per_token(model)
    achieved = out.get("decode_b1_tok_s", 0) * per_token
    failures = compiled.compile_failures(model)
    out.update(compile=engine.compile.mode, compiled=engine.compile.on and not failures,
               compile_decision=str(engine.compile), compile_failure=failures[0] if failures else None,
               weight_bytes_per_token=per_token, achieved_gb_s=achieved / 1e9, bandwidth_gb_s=bandwidth / 1e9,
               mbu=achieved / bandwidth, peak_rss_bytes=peak_rss(), **cache_report(cache))
    return out


def cache_report(cache: PagedCache) -> dict:
    """The pool a run used: its budget, blocks, and the bytes one more token of context costs
    (KV in every layer plus its share of the CCA snapshot kept beside each block)."""
    return {"cache_memory_bytes": cache.memory, "cache_blocks": cache.num_blocks - 1,
            "cache_block_size": cache.block_size, "cache_capacity_tokens": cache.capacity_tokens,
            "cache_bytes_per_token": cache.bytes_per_token,
            "cca_state_bytes_per_sequence": state_bytes(cache.config, cache.dtype)}


# --------------------------------------------------------------------------------------- quality
def quality(model_path, quantize: str, reference=None, text: str = TEXT, greedy_tokens: int = 256) -> dict:
    """A quantized model against the bf16 one: greedy agreement, teacher-forced top-1 and mean KL."""
    ref = reference or load(model_path, dtype="bf16")
    q = load(model_path, dtype="bf16", quantize=quantize)
    if ref.tokenizer is not None:
        ids = ref.tokenizer.encode(text)
    else:
        ids = torch.randint(3, ref.config.vocab_size, (96,), generator=torch.Generator().manual_seed(0)).tolist()
    a = ref.logits([ids]).float().log_softmax(-1)[0]
    b = q.logits([ids]).float().log_softmax(-1)[0]
    kl = (a.exp() * (a - b)).sum(-1).mean().item()
    top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    prompt = ids[:16]
    ga = ref.generate([prompt], max_new_tokens=greedy_tokens, temperature=0, ignore_eos=True)[0].token_ids
    gb = q.generate([prompt], max_new_tokens=greedy_tokens, temperature=0, ignore_eos=True)[0].token_ids
    same = sum(x == y for x, y in zip(ga, gb))
    first = next((i for i, (x, y) in enumerate(zip(ga, gb)) if x != y), min(len(ga), len(gb)))
    return {"quantize": quantize, "text_tokens": len(ids), "top1_agreement": top1, "mean_kl": kl,
            "greedy_agreement": same / max(1, len(ga)), "greedy_first_divergence": first}


# ------------------------------------------------------------------------------------------ CLI
def cmd_bench(args) -> int:
    path = resolve_model_name(args.model)
    if args.quality:
        ref = load(path, dtype="bf16")
        results = {"model": str(ref.path), "quality": [quality(path, q, ref, greedy_tokens=args.greedy_tokens)
                                                      for q in args.quality_modes.split(",")]}
        for r in results["quality"]:
            print(f"{r['quantize']:>8}: greedy agreement {r['greedy_agreement']:.1%} (first divergence at "
                  f"{r['greedy_first_divergence']}), top-1 {r['top1_agreement']:.1%}, mean KL {r['mean_kl']:.4f}")
        print(json.dumps(results))
        return 0
    start = time.perf_counter()
    llm = load(path, dtype=args.dtype, quantize=args.quantize, adapter=args.adapter, cache_memory=args.cache_memory,
               prefix_caching=args.prefix_caching, compile=args.compile)
    load_s = time.perf_counter() - start
    rss_after_load = peak_rss()
    r = speed(llm.model, prefill_tokens=args.prefill_tokens, new_tokens=args.new_tokens,
              batches=tuple(int(b) for b in args.batches.split(",")), rounds=args.rounds, cache=llm.cache,
              speculative=args.speculative, compile=args.compile)
    r.update(model=str(llm.path), dtype=str(next(llm.model.parameters()).dtype).replace("torch.", ""),
             quantize=args.quantize or (llm.config.quantization or {}).get("bits"), load_s=load_s,
             peak_rss_after_load_bytes=rss_after_load)
    failed = f"; compiling failed, so it ran eager ({r['compile_failure']})" if r["compile_failure"] else ""
    print(f"decode step: {r['compile_decision']}{failed}")
    print(f"prefill {r['prefill_tokens']} tokens: {r['prefill_tok_s']:.1f} tok/s")
    for b in args.batches.split(","):
        print(f"decode batch {b}: {r[f'decode_b{b}_tok_s']:.1f} tok/s")
    if args.speculative:
        acc = r["draft_acceptance"]
        print(f"speculative (drafts up to {args.speculative}): draft acceptance "
              f"{'n/a' if acc is None else f'{acc:.1%}'}, {r['tokens_per_forward']:.2f} tokens per row-forward")
    print(f"weights read per token {r['weight_bytes_per_token'] / 1e6:.1f} MB, achieved {r['achieved_gb_s']:.1f} GB/s "
          f"of {r['bandwidth_gb_s']:.1f} GB/s measured (MBU {r['mbu']:.0%}), peak RSS {r['peak_rss_bytes'] / 1e6:.0f} MB")
    print(f"kv cache {r['cache_bytes_per_token']:,.0f} bytes per token (+ {r['cca_state_bytes_per_sequence']:,} bytes "
          f"of CCA state per sequence); pool {r['cache_blocks']:,} blocks x {r['cache_block_size']} tokens = "
          f"{r['cache_capacity_tokens']:,} tokens in {r['cache_memory_bytes'] / 2**20:,.1f} MiB")
    print(json.dumps(r))
    return 0


def register(sub) -> None:
    p = sub.add_parser("bench", help="prefill/decode tok/s, GB/s and MBU; --quality compares int8/int4 to bf16",
                       description="Benchmark a model on this machine. The last line is one JSON object.")
    add_model_args(p)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per measurement")
    p.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    p.add_argument("--rounds", type=int, default=3, help="repeats per figure (the median is reported)")
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="decode with prompt-lookup drafts of up to K tokens and report acceptance (default 0: off)")
    p.add_argument("--quality", action="store_true", help="report int8/int4 agreement with bf16 instead of speed")
    p.add_argument("--quality-modes", default="int8,int4")
    p.add_argument("--greedy-tokens", type=int, default=256)
    p.set_defaults(func=cmd_bench)
