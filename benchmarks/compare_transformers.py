"""zaya against transformers' ZayaForCausalLM on the same random weights.

    python benchmarks/compare_transformers.py --shape mini      # 460M parameters, 0.9 GB bf16
    python benchmarks/compare_transformers.py --shape real4     # ZAYA1-8B layer shape, 4 layers

The checkpoint (bf16, plus int8 / int4 copies written by `zaya quantize`) is built once under
--dir. Each round runs every workload through every runner in turn (transformers, zaya bf16,
int8, int4, ...), so drift and other jobs on the machine hit all of them alike; medians are
printed with the ratio to transformers bf16. Peak RSS while loading is measured in fresh
subprocesses. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from zaya_side import SHAPES, ZayaRunner, build, checkpoint_bytes_per_token, file_bytes, prompts  # noqa: E402


# ------------------------------------------------------------------------------------ runners
class HFRunner:
    """transformers eager: prefill with a DynamicCache, then one forward per token, greedy."""

    def __init__(self, path: Path):
        import transformers

        self.model = transformers.ZayaForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        self.vocab = self.model.config.vocab_size

    @torch.inference_mode()
    def decode(self, batch, prompt_len, new_tokens, seed):
        ids = prompts(batch, prompt_len, self.vocab, seed)
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = self.model(nxt, past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        return batch * new_tokens / (time.perf_counter() - start)

    @torch.inference_mode()
    def prefill(self, tokens, seed):
        ids = prompts(1, tokens, self.vocab, seed)
        start = time.perf_counter()
        self.model(ids, use_cache=True, logits_to_keep=1)
        return tokens / (time.perf_counter() - start)

    @torch.inference_mode()
    def logits(self, tokens, seed):
        """Full-sequence fp32 logits, as a scoring call asks for them."""
        ids = prompts(1, tokens, self.vocab, seed)
        start = time.perf_counter()
        self.model(ids).logits.float()
        return tokens / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------- peak RSS
RSS_CHILD = r"""
import json, sys
import zaya
from zaya.bench import peak_rss
base = peak_rss()
llm = zaya.load(sys.argv[1], dtype="bf16", quantize=(sys.argv[2] if sys.argv[2] != "-" else None))
llm.generate([list(range(3, 19))], max_new_tokens=4, temperature=0, ignore_eos=True)
peak = peak_rss()
print(json.dumps({"baseline_rss": base, "peak_rss": peak}))
"""


def rss(path: Path, quantize=None) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path), quantize or "-"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="mini")
    ap.add_argument("--dir", type=Path, default=Path(__file__).resolve().parent / ".checkpoints")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--runners", default="transformers,bf16,int8,int4")
    ap.add_argument("--workloads", default="decode_b1,decode_b8,decode_b1_ctx1024,prefill_512")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads for everything (0: torch's default); zaya's decode steps use "
                         "ZAYA_DECODE_THREADS (default 1) either way")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    paths = build(args.shape, args.dir, args.group_size)
    runners = {}
    for name in args.runners.split(","):
        runners[name] = HFRunner(paths["bf16"]) if name == "transformers" else ZayaRunner(paths[name])
    workloads = {
        "decode_b1": lambda r, s: r.decode(1, 32, args.new_tokens, s),
        "decode_b8": lambda r, s: r.decode(8, 32, args.new_tokens, s),
        "decode_b1_ctx1024": lambda r, s: r.decode(1, 1024, args.new_tokens, s),
        "prefill_512": lambda r, s: r.prefill(512, s),
        "logits_512": lambda r, s: r.logits(512, s),
    }
    chosen = args.workloads.split(",")
    for r in runners.values():  # warm-up: first-call allocations, lazy kernel selection
        r.decode(1, 8, 2, 99)
    samples = {(w, n): [] for w in chosen for n in runners}
    for rnd in range(args.rounds):
        for w in chosen:
            for n, r in runners.items():
                samples[(w, n)].append(workloads[w](r, rnd))
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
    results = {"shape": args.shape, "rounds": args.rounds, "threads": torch.get_num_threads(), "tok_s": {}, "ratio_vs_transformers": {}}
    print(f"\n{args.shape}: median tok/s over {args.rounds} alternated rounds (ratio = zaya / transformers bf16)")
    print(f"{'workload':<18}" + "".join(f"{n:>22}" for n in runners))
    for w in chosen:
        med = {n: statistics.median(samples[(w, n)]) for n in runners}
        results["tok_s"][w] = med
        base = med.get("transformers")
        cells = []
        for n in runners:
            ratio = med[n] / base if base else None
            results["ratio_vs_transformers"].setdefault(w, {})[n] = ratio
            cells.append(f"{med[n]:9.1f}" + (f" ({ratio:5.2f}x)" if ratio and n != "transformers" else " " * 9))
        print(f"{w:<18}" + "".join(f"{c:>22}" for c in cells))
    if "bf16" in runners:
        from zaya.bench import measure_bandwidth

        bw = measure_bandwidth()
        results["bandwidth_gb_s"] = bw / 1e9
        results["mbu_b1"] = {}
        for n in runners:
            if n != "transformers" and "decode_b1" in chosen:
                mbu = results["tok_s"]["decode_b1"][n] * checkpoint_bytes_per_token(paths[n]) / bw
                results["mbu_b1"][n] = mbu
        print(f"MBU at batch 1 (bandwidth measured now: {bw / 1e9:.1f} GB/s): " +
              ", ".join(f"{n} {v:.0%}" for n, v in results["mbu_b1"].items()))
    if not args.no_rss:
        runners.clear()
        size = file_bytes(paths["bf16"])
        results["rss"] = {}
        for label, path, q in (("bf16", paths["bf16"], None), ("int8", paths["int8"], None),
                               ("int4", paths["int4"], None), ("bf16->int8 at load", paths["bf16"], "int8"),
                               ("bf16->int4 at load", paths["bf16"], "int4")):
            m = rss(path, q)
            m.update(file_bytes=file_bytes(path), ratio_to_bf16_file=m["peak_rss"] / size,
                     ratio_above_baseline=(m["peak_rss"] - m["baseline_rss"]) / size)
            results["rss"][label] = m
            print(f"peak RSS {label:<20} {m['peak_rss'] / 1e6:7.0f} MB = {m['ratio_to_bf16_file']:.2f}x the bf16 "
                  f"file ({size / 1e6:.0f} MB); above the {m['baseline_rss'] / 1e6:.0f} MB import baseline: "
                  f"{m['ratio_above_baseline']:.2f}x")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
