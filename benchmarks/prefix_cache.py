"""The paged cache and prefix caching, measured against recomputing and against the old engine.

    python benchmarks/prefix_cache.py                         # every figure, small and mini shapes
    python benchmarks/prefix_cache.py --only repeat,chat --shapes small --rounds 1

    repeat  a 3,000-token prompt sent twice (a new prompt every round): time to first token of the
            second request over the first's (target <= 0.2)
    chat    10 turns with the built-in chat template (small shape): prompt tokens computed with the
            prefix cache over without, and the total time of both (target <= 0.3)
    rsa     Markovian RSA rounds 1 and 2 (zaya.rsa's aggregation template over round t-1's tails):
            prompt tokens and computed tokens per round, prefill time with the cache over without
            (target <= 0.6)
    decode  batch 1 and batch 8 decode tok/s of this code over the reference's (the engine before
            the paged cache), the two loaded in two worker processes and measured alternately
            (target >= 0.95)
    memory  32 concurrent streams: the peak cache bytes of the reference and of this code

The reference is the tree of ``--reference`` (default: the newest commit on HEAD's first-parent
line that still has the dense ``zaya/cache.py``, i.e. main just before the paged cache was merged),
unpacked with ``git archive``. Random checkpoints (bf16) are built once
under ``--dir``. Every figure is printed with the 1-minute load average while it was measured,
since medians on a busy machine are still noisy; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compare_transformers import SHAPES as MODEL_SHAPES  # noqa: E402 (a sibling script)

SHAPES = {  # "small": the random hidden-512, 6-layer model of issue 12, with the built-in vocabulary
    "small": dict(vocab_size=768, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=64, num_experts=8, moe_intermediate_size=1024,
                  router_hidden_size=128),
    "mini": MODEL_SHAPES["mini"],
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WORDS = ("river field church market harvest water boat grain fence road town miller rain silt night "
         "morning hill people count measure years stores what could best next left rich low").split()


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def build(shape: str, root: Path) -> Path:
    from zaya.checkpoint import save, state_for_saving
    from zaya.config import ZayaConfig
    from zaya.llm import DEFAULT_MODEL
    from zaya.model import ZayaForCausalLM

    path = root / shape
    if not (path / "config.json").is_file():
        config = ZayaConfig.from_dict({**SHAPES[shape], "max_position_embeddings": 8192, "dtype": "bfloat16",
                                       "bos_token_id": 2, "eos_token_id": 6})
        model = ZayaForCausalLM(config)
        model.init_weights(seed=0)
        save(state_for_saving(model.to(torch.bfloat16)), config, path)
        if shape == "small":
            for name in TOKENIZER_FILES:
                shutil.copy(DEFAULT_MODEL / name, path / name)
    return path


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return [2] + torch.randint(10, vocab, (n - 1,), generator=torch.Generator().manual_seed(seed)).tolist()


def text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def ttft(llm, ids) -> float:
    start = time.perf_counter()
    next(iter(llm.stream([ids], max_new_tokens=1, temperature=0)))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------- workloads
def bench_repeat(path: Path, rounds: int) -> dict:
    import zaya

    llm = zaya.load(path)
    ttft(llm, random_ids(64, llm.config.vocab_size, 999))  # warm-up
    ratios, firsts, seconds, loads = [], [], [], []
    for r in range(rounds):
        ids = random_ids(3000, llm.config.vocab_size, r)
        first, second = ttft(llm, ids), ttft(llm, ids)
        firsts.append(first)
        seconds.append(second)
        ratios.append(second / first)
        loads.append(load_avg())
    out = {"first_s": statistics.median(firsts), "second_s": statistics.median(seconds),
           "ratio": statistics.median(ratios), "load": max(loads), "target": 0.2}
    print(f"repeat {path.name}: 3000-token prompt, first {out['first_s']:.3f} s, repeat {out['second_s']:.3f} s, "
          f"ratio {out['ratio']:.3f} (target <= 0.2; load {out['load']})")
    return out


def chat_run(llm, turns: list[str], system: str, record=None) -> tuple[int, int, float]:
    """A conversation; replies are replayed from ``record`` when given (both runs then see the
    same history). Returns prompt tokens, computed prompt tokens, seconds."""
    messages = [{"role": "system", "content": system}]
    prompt = computed = 0
    start = time.perf_counter()
    for i, user in enumerate(turns):
        messages.append({"role": "user", "content": user})
        reply = llm.chat(messages, max_new_tokens=48, temperature=0, ignore_eos=True)
        c = reply.completion
        prompt, computed = prompt + c.prompt_tokens, computed + c.prompt_tokens - c.cached_tokens
        if record is not None and len(record) > i:
            content, reasoning = record[i]
        else:
            content, reasoning = reply.content, reply.reasoning
            if record is not None:
                record.append((content, reasoning))
        messages.append({"role": "assistant", "content": content, "reasoning_content": reasoning})
    return prompt, computed, time.perf_counter() - start


def bench_chat(path: Path) -> dict:
    import zaya

    system = "You are a careful assistant. " + text(150, 1)
    turns = [text(40 + 10 * (i % 3), 10 + i) for i in range(10)]
    record: list = []
    cached = zaya.load(path)
    plain = zaya.load(path, prefix_caching=False)
    p1, c1, t1 = chat_run(cached, turns, system, record)
    p0, c0, t0 = chat_run(plain, turns, system, record)
    out = {"prompt_tokens": p1, "computed_cached": c1, "computed_plain": c0, "ratio": c1 / c0,
           "seconds_cached": t1, "seconds_plain": t0, "load": load_avg(), "target": 0.3}
    print(f"chat: 10 turns, {p1} prompt tokens; computed {c1} with the prefix cache, {c0} without "
          f"(ratio {out['ratio']:.3f}, target <= 0.3); total {t1:.2f} s vs {t0:.2f} s (load {out['load']})")
    return out


def rsa_prompts(llm, question: str, texts: list[str], k: int, tau: int, rng) -> list[list[int]]:
    from zaya.rsa.prompts import ZYPHRA

    tails = [llm.tokenizer.decode(llm.tokenizer.encode(t, add_special_tokens=False)[-tau:]) for t in texts]
    out = []
    for _ in texts:
        message = ZYPHRA(question, [tails[j] for j in rng.sample(range(len(texts)), k)])
        out.append(llm.apply_chat_template([{"role": "user", "content": message}]))
    return out


def timed_prefill(llm, prompts) -> tuple[float, int]:
    start = time.perf_counter()
    done = llm.generate(prompts, max_new_tokens=1, temperature=0)
    return time.perf_counter() - start, sum(c.prompt_tokens - c.cached_tokens for c in done)


def bench_rsa(path: Path, n: int = 8, k: int = 4, tau: int = 64, budget: int = 96) -> dict:
    import zaya

    question = "Solve the following problem. " + text(220, 2) + " What is the total?"
    cached, plain = zaya.load(path), zaya.load(path, prefix_caching=False)
    kw = dict(temperature=1.0, seed=0, ignore_eos=True, max_new_tokens=budget)
    first = cached.apply_chat_template([{"role": "user", "content": question}])
    texts = [c.text for c in cached.generate([first], n=n, **kw)]
    rng, rounds = random.Random(0), []
    for t in (1, 2):
        prompts = rsa_prompts(cached, question, texts, k, tau, rng)
        total = sum(map(len, prompts))
        with_cache, computed = timed_prefill(cached, prompts)
        without, _ = timed_prefill(plain, prompts)
        rounds.append({"round": t, "prompt_tokens": total, "computed_tokens": computed, "prefill_cached_s": with_cache,
                       "prefill_plain_s": without, "ratio": with_cache / without, "load": load_avg()})
        print(f"rsa round {t}: {n} prompts, {total} prompt tokens, {computed} computed with the cache; prefill "
              f"{with_cache:.2f} s vs {without:.2f} s (ratio {with_cache / without:.3f}, target <= 0.6; "
              f"load {rounds[-1]['load']})")
        texts = [c.text for c in cached.generate(prompts, **kw)]
    return {"n": n, "k": k, "tau": tau, "question_tokens": len(first), "rounds": rounds, "target": 0.6}


# ---------------------------------------------------------------------- against the old engine
WORKER = r"""
import json, sys, time, torch, zaya
from zaya.engine import Request
from zaya.sampling import SamplingParams
llm = zaya.load(sys.argv[1])
V = llm.config.vocab_size

def run(requests):
    eng = llm.engine()
    for r in requests:
        eng.add(r)
    firsts, tokens, start, peak = set(), 0, None, 0
    while eng.active:
        for ev in eng.step():
            if start is not None and ev.token_id is not None:
                tokens += 1
            firsts.add((ev.prompt_index, ev.index))
        if start is None and len(firsts) == sum(r.params.n for r in requests):
            start = time.perf_counter()
        c = eng.cache
        if hasattr(c, "used_bytes"):  # paged: the blocks, snapshots and state slots held
            peak = max(peak, c.used_bytes())
        elif c is not None:  # the dense cache of the reference: what it allocated
            peak = max(peak, c.nbytes())
    return tokens / (time.perf_counter() - start), peak

for line in sys.stdin:
    cmd = json.loads(line)
    g = torch.Generator().manual_seed(cmd["seed"])
    reqs = [Request(torch.randint(3, V, (n,), generator=g).tolist(),
                    SamplingParams(max_new_tokens=m, temperature=0, ignore_eos=True), i)
            for i, (n, m) in enumerate(cmd["rows"])]
    rate, peak = run(reqs)
    print(json.dumps({"tok_s": rate, "peak_cache_bytes": peak}), flush=True)
"""


class Worker:
    def __init__(self, code_root: Path, model: Path):
        env = dict(os.environ, PYTHONPATH=str(code_root))
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(model)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())

    def __call__(self, rows, seed: int) -> dict:
        self.proc.stdin.write(json.dumps({"rows": rows, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def reference_tree(rev: str | None, out: Path) -> tuple[Path, str]:
    if rev is None:  # the newest commit on the first-parent line that still had the dense cache
        line = subprocess.check_output(["git", "rev-list", "--first-parent", "HEAD"], cwd=ROOT, text=True).split()
        rev = next(sha for sha in line if subprocess.run(["git", "cat-file", "-e", f"{sha}:zaya/cache.py"], cwd=ROOT,
                                                         capture_output=True).returncode == 0)
    sha = subprocess.check_output(["git", "rev-parse", rev], cwd=ROOT, text=True).strip()
    archive = subprocess.run(["git", "archive", sha, "zaya"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out, sha


def bench_against_reference(path: Path, reference: Path, rounds: int, new_tokens: int = 64) -> dict:
    old, new = Worker(reference, path), Worker(ROOT, path)
    try:
        out = {}
        for batch in (1, 8):
            rates = {"reference": [], "paged": []}
            loads = []
            for r in range(rounds):  # alternate, so drift and other jobs hit both alike
                for name, worker in (("reference", old), ("paged", new))[::1 if r % 2 == 0 else -1]:
                    rates[name].append(worker([(32, new_tokens)] * batch, seed=r)["tok_s"])
                loads.append(load_avg())
            ref, paged = statistics.median(rates["reference"]), statistics.median(rates["paged"])
            out[f"decode_b{batch}"] = {"reference_tok_s": ref, "paged_tok_s": paged, "ratio": paged / ref,
                                       "load": max(loads), "target": 0.95}
            print(f"decode {path.name} batch {batch}: reference {ref:.1f} tok/s, paged {paged:.1f} tok/s, ratio "
                  f"{paged / ref:.3f} (target >= 0.95; load {max(loads)})")
        g = random.Random(0)
        rows = [(g.randrange(100, 600), g.randrange(32, 256)) for _ in range(32)]
        peaks = {name: worker(rows, seed=0)["peak_cache_bytes"] for name, worker in (("reference", old), ("paged", new))}
        out["memory_32_streams"] = {**{f"{k}_bytes": v for k, v in peaks.items()}, "load": load_avg()}
        print(f"memory {path.name}: 32 streams, peak cache {peaks['reference'] / 2**20:.1f} MiB before, "
              f"{peaks['paged'] / 2**20:.1f} MiB paged")
        return out
    finally:
        old.close()
        new.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zaya-prefix-bench")
    ap.add_argument("--shapes", default="small,mini")
    ap.add_argument("--only", default="repeat,chat,rsa,decode")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reference", default=None, help="git revision of the engine to compare decode and memory with")
    args = ap.parse_args()
    only, shapes = set(args.only.split(",")), args.shapes.split(",")
    paths = {s: build(s, args.dir) for s in shapes}
    result = {"load_at_start": load_avg(), "threads": torch.get_num_threads(), "shapes": {}}
    for shape, path in paths.items():
        r = result["shapes"][shape] = {}
        if "repeat" in only:
            r["repeat"] = bench_repeat(path, args.rounds)
        if shape == "small" and "chat" in only:
            r["chat"] = bench_chat(path)
        if shape == "small" and "rsa" in only:
            r["rsa"] = bench_rsa(path)
        if "decode" in only:
            with tempfile.TemporaryDirectory() as tmp:
                tree, sha = reference_tree(args.reference, Path(tmp))
                result["reference"] = sha
                r.update(bench_against_reference(path, tree, args.rounds))
    result["load_at_end"] = load_avg()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
