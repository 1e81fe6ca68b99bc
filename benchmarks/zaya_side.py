"""The zaya half of the comparison scripts (compare_transformers.py, compare_llamacpp.py): the
model shapes, the random checkpoints built once under benchmarks/.checkpoints/, zaya timed through
its public API and the bytes of weights read per decode token.

    python benchmarks/zaya_side.py build --shape mini           # prints {"bf16": DIR, "int8": ..., "int4": ...}
    python benchmarks/zaya_side.py run DIR --workloads decode_b1,prefill_512 --threads 2 --seed 0

zaya is driven only through ``zaya.load``, ``LLM.engine()``, ``Request``, ``SamplingParams`` and
the ``zaya`` command, so the scripts keep measuring the same thing while the engine's insides
change; the read bandwidth and peak RSS are the figures ``zaya bench`` reports (``zaya.bench``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = Path(__file__).resolve().parent / ".checkpoints"

SHAPES = {
    "mini": dict(vocab_size=32768, hidden_size=1024, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=128, num_experts=16, moe_intermediate_size=1024,
                 router_hidden_size=256),
    "real4": dict(vocab_size=262272, hidden_size=2048, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=128, num_experts=16, moe_intermediate_size=2048,
                  router_hidden_size=256),
}

# name -> (kind, batch or prompt tokens, prompt length); every decode figure is tok/s summed over the batch
WORKLOADS = {
    "decode_b1": ("decode", 1, 32),
    "decode_b8": ("decode", 8, 32),
    "decode_b1_ctx1024": ("decode", 1, 1024),
    "prefill_512": ("prefill", 512, 512),
    "logits_512": ("logits", 512, 512),  # LLM.logits(): every position's fp32 logits (scoring, echo)
}

_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8}


def build(shape: str, root: Path = CHECKPOINTS, group_size: int = 64) -> dict[str, Path]:
    """The random bf16 checkpoint of ``shape`` and its int8 / int4 copies, built once and reused.

    transformers' ZayaForCausalLM writes the float checkpoint (every matrix but the convs drawn from
    N(0, 0.02), trained-like scales: no all-equal router logits, a spread of expert choices);
    ``zaya quantize`` writes the quantized copies."""
    import torch

    base = root / shape
    if not (base / "config.json").is_file():
        import transformers

        print(f"building a random {shape} checkpoint in {base} ...", file=sys.stderr)
        torch.manual_seed(0)
        cfg = transformers.ZayaConfig(**SHAPES[shape], max_position_embeddings=4096)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in bf16: real4 would take 5.6 GB in fp32
        try:
            model = transformers.ZayaForCausalLM(cfg)
        finally:
            torch.set_default_dtype(default)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() >= 2 and "conv" not in name:
                    p.normal_(0.0, 0.02)
        model.save_pretrained(base)
        del model
    paths = {"bf16": base}
    for bits in (8, 4):
        out = root / f"{shape}-int{bits}"
        if not (out / "config.json").is_file():
            print(f"zaya quantize --bits {bits} {base} {out}", file=sys.stderr)
            subprocess.run([str(Path(sys.executable).parent / "zaya"), "quantize", "--bits", str(bits),
                            "--group-size", str(group_size), str(base), str(out)], check=True)
        paths[f"int{bits}"] = out
    return paths


def checkpoint_bytes_per_token(path: Path) -> int:
    """Bytes of weights one batch-1 decode step reads, counted from the checkpoint's safetensors
    headers: everything but the unchosen experts and the embedding table (a lookup reads one row;
    a tied head is counted once, as the head)."""
    config = json.loads((Path(path) / "config.json").read_text())
    experts = config["num_experts"] // config.get("num_experts_per_tok", 1)
    tied = config.get("tie_word_embeddings", True)
    total = 0
    for name, shape, dtype in _safetensors_entries(Path(path)):
        nbytes = _DTYPE_BYTES[dtype]
        for n in shape:
            nbytes *= n
        if ".mlp.experts." in name:
            nbytes //= experts
        elif name.startswith("model.embed_tokens.") and not tied:
            nbytes = 0
        total += nbytes
    return total


def _safetensors_entries(path: Path):
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for f in files:
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, entry in header.items():
            if name != "__metadata__":
                yield name, entry["shape"], entry["dtype"]


def file_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def set_threads(n: int) -> None:
    """Use ``n`` threads for everything, decode steps included (0: leave torch's default)."""
    import torch

    if n:
        torch.set_num_threads(n)
        os.environ["ZAYA_DECODE_THREADS"] = str(n)


def prompts(batch: int, length: int, vocab: int, seed: int):
    import torch

    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


class ZayaRunner:
    """zaya through ``LLM.engine()``, the path `generate` and the server use; greedy, EOS ignored."""

    def __init__(self, path: Path, quantize=None):
        import zaya

        self.llm = zaya.load(path, dtype="bf16", quantize=quantize)
        self.vocab = self.llm.config.vocab_size

    def decode(self, batch: int, prompt_len: int, new_tokens: int, seed: int) -> float:
        """Summed tok/s over ``new_tokens - 1`` timed steps after the first (prefill excluded)."""
        from zaya.engine import Request
        from zaya.sampling import SamplingParams

        engine = self.llm.engine()
        params = SamplingParams.from_kwargs(max_new_tokens=new_tokens + 1, temperature=0, ignore_eos=True)
        for i, ids in enumerate(prompts(batch, prompt_len, self.vocab, seed).tolist()):
            engine.add(Request(ids, params, i))
        engine.step()  # samples from the prefill's logits and runs the first forward
        start, steps = time.perf_counter(), 0
        while engine.active:
            engine.step()
            steps += 1
        # the last step only samples; the others each ran one forward
        return batch * max(1, steps - 1) / (time.perf_counter() - start)

    def prefill(self, tokens: int, seed: int) -> float:
        """Prompt tok/s of a prefill: one request of ``tokens`` prompt tokens and one new token,
        stepped until done (`Engine.add` only queues; the steps prefill, in chunks of the
        engine's step budget, and sample the one token)."""
        from zaya.engine import Request
        from zaya.sampling import SamplingParams

        engine = self.llm.engine(step_tokens=tokens)
        params = SamplingParams.from_kwargs(max_new_tokens=1, temperature=0, ignore_eos=True)
        ids = prompts(1, tokens, self.vocab, seed + 7919)[0].tolist()  # shares no block with decode's prompts
        start = time.perf_counter()
        engine.add(Request(ids, params))
        while engine.active:
            engine.step()
        return tokens / (time.perf_counter() - start)

    def logits(self, tokens: int, seed: int) -> float:
        """Prompt tok/s of ``LLM.logits`` (fp32 logits at every position)."""
        ids = prompts(1, tokens, self.vocab, seed)
        start = time.perf_counter()
        self.llm.logits(ids)
        return tokens / (time.perf_counter() - start)

    def run(self, workload: str, new_tokens: int, seed: int) -> float:
        kind, size, prompt_len = WORKLOADS[workload]
        if kind == "prefill":
            return self.prefill(size, seed)
        if kind == "logits":
            return self.logits(size, seed)
        return self.decode(size, prompt_len, new_tokens, seed)

    def warm_up(self) -> None:
        """First-call allocations, lazy kernel selection and compiled graphs (``ZAYA_COMPILE``, one
        per batch size), outside the timings."""
        self.decode(1, 8, 2, 99)
        self.decode(8, 8, 2, 99)
        self.prefill(64, 99)


def run(path: Path, workloads: list[str], new_tokens: int, seed: int) -> dict:
    """Load, warm up and time each workload once; tok/s by workload plus the peak RSS."""
    from zaya.bench import peak_rss

    runner = ZayaRunner(path)
    runner.warm_up()
    out = {w: runner.run(w, new_tokens, seed) for w in workloads}
    return {"tok_s": out, "peak_rss": peak_rss()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (once) the random checkpoint of a shape and its int8 / int4 copies")
    b.add_argument("--shape", choices=list(SHAPES), default="mini")
    b.add_argument("--dir", type=Path, default=CHECKPOINTS)
    b.add_argument("--group-size", type=int, default=64)
    r = sub.add_parser("run", help="time workloads on one checkpoint in this process")
    r.add_argument("path", type=Path)
    r.add_argument("--workloads", default="decode_b1,prefill_512,decode_b1_ctx1024")
    r.add_argument("--new-tokens", type=int, default=32)
    r.add_argument("--threads", type=int, default=0, help="threads for everything (0: torch's default)")
    r.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        out = {k: str(v) for k, v in build(args.shape, args.dir, args.group_size).items()}
    else:
        set_threads(args.threads)
        out = run(args.path, args.workloads.split(","), args.new_tokens, args.seed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
