"""Peak resident memory per rank: FSDP against DDP, fine-tuning a scaled ZAYA1 model on 2 CPU ranks.

    python benchmarks/fsdp_memory.py                       # 4 layers, 2 experts, vocabulary 8192
    python benchmarks/fsdp_memory.py --layers 8 --experts 4 --vocab 32768 --steps 4

The model has ZAYA1-8B's block shape (hidden 2048, 8 query / 2 KV heads of 128, experts of
intermediate size 2048, router 256) with fewer blocks and experts and a shorter vocabulary, so
that two ranks of either strategy fit a shared machine. It is written once as a bf16 checkpoint;
each strategy then fine-tunes it from there under ``torchrun --nproc-per-node 2`` (gloo): the
checkpoint read tensor by tensor, bf16 compute (DDP: autocast over fp32 weights; FSDP: its
mixed-precision policy over fp32 shards), activation checkpointing, AdamW, a final checkpoint.
Every rank reports its peak resident set (``ru_maxrss``), which includes the ~0.4 GB that
importing torch and starting gloo costs any process. The strategies run one after the other,
alternating when ``--repeats`` > 1. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zaya.checkpoint import read_config, save, state_for_saving  # noqa: E402
from zaya.config import ZayaConfig  # noqa: E402
from zaya.model import ZayaForCausalLM  # noqa: E402
from zaya.train import load_config, train  # noqa: E402
from zaya.train.memory import estimate  # noqa: E402

SHAPE = dict(hidden_size=2048, num_attention_heads=8, num_key_value_heads=2, head_dim=128, moe_intermediate_size=2048,
             router_hidden_size=256, max_position_embeddings=4096, dtype="bfloat16")


def write_base(path: Path, layers: int, experts: int, vocab: int) -> Path:
    if (path / "config.json").is_file():
        return path
    config = ZayaConfig.from_dict({**SHAPE, "num_hidden_layers": layers, "num_experts": experts, "vocab_size": vocab})
    with torch.device("meta"):
        model = ZayaForCausalLM(config)
    model.to_empty(device="cpu")
    model.tie_weights()
    model.init_weights(0)
    state = {k: v if k.endswith("balancing_biases") else v.to(torch.bfloat16)
             for k, v in state_for_saving(model).items()}
    save(state, config, path)
    for f in (ROOT / "recipes" / "tokenizer-tiny").iterdir():
        shutil.copyfile(f, path / f.name)
    return path


def write_config(path: Path, base: Path, out: Path, strategy: str, steps: int, seq_len: int) -> Path:
    path.write_text(f"""
[model]
init_from = "{base}"
[data]
train = ["{ROOT}/docs/*.md", "{ROOT}/README.md"]
holdout = 0
seq_len = {seq_len}
[optim]
lr = 1e-5
min_lr = 1e-6
warmup_steps = 0
[train]
out_dir = "{out}"
steps = {steps}
global_batch = 2
micro_batch = 1
precision = "bf16"
activation_checkpointing = true
progress = false
[distributed]
strategy = "{strategy}"
""")
    return path


def worker(config: str) -> None:
    """One rank: train, then report the peak resident set."""
    train(load_config(config), log=lambda *a, **k: None)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RSS " + json.dumps({"rank": int(os.environ["RANK"]), "peak_bytes": peak}), flush=True)


def launch(config: Path) -> tuple[list[int], float]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, "--worker", str(config)], env=env, capture_output=True, text=True)
    if proc.returncode:
        errors = [line for line in proc.stderr.splitlines() if "Error:" in line]
        raise SystemExit("\n".join(errors[-3:]) or proc.stderr[-3000:])
    peaks = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("RSS ")]
    return [p["peak_bytes"] for p in sorted(peaks, key=lambda p: p["rank"])], time.perf_counter() - t0


def estimates(config: Path) -> dict:
    cfg = load_config(config)
    est = estimate(cfg, read_config(Path(cfg.model.init_from))[0], 2)
    return {"state": est.state, "total": est.total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--dir", type=Path, default=ROOT / "build" / "bench-fsdp")
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    shape = f"l{args.layers}-e{args.experts}-v{args.vocab}"
    base = write_base(args.dir / f"base-{shape}", args.layers, args.experts, args.vocab)
    results = {"ddp": [], "fsdp": []}
    for _ in range(args.repeats):
        for strategy in ("ddp", "fsdp"):
            out = args.dir / f"run-{strategy}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = write_config(args.dir / f"{strategy}.toml", base, out, strategy, args.steps, args.seq_len)
            peaks, seconds = launch(cfg)
            results[strategy].append({"peak_bytes": peaks, "seconds": round(seconds, 1), "estimate": estimates(cfg)})
            estimate = results[strategy][-1]["estimate"]["total"] / 1e9
            print(f"{strategy:>4}: peak RSS per rank {', '.join(f'{b / 1e9:.2f}' for b in peaks)} GB "
                  f"(estimate {estimate:.2f} GB + the process), {seconds:.0f} s", flush=True)
    worst = {s: max(max(r["peak_bytes"]) for r in rs) for s, rs in results.items()}
    ratio = worst["fsdp"] / worst["ddp"]
    print(f"FSDP / DDP peak RSS per rank: {ratio:.2f}")
    print(json.dumps({"shape": shape, "seq_len": args.seq_len, "steps": args.steps, "ratio": round(ratio, 3),
                      **results}))


if __name__ == "__main__":
    main()
