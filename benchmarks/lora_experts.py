"""LoRA on the experts: one low-rank pair per expert (what zaya.lora does) against one pair shared by
all experts, and attention-only adapters for reference.

    python benchmarks/lora_experts.py                      # the built-in model, fine-tuned on the docs
    python benchmarks/lora_experts.py --steps 300 --r 8

Each variant fine-tunes the same base (the built-in model unless --model) on the same data, batches
and seed, and reports trained parameters, eval loss before and after, and seconds per step (the
variants run in turn, so compare times only on an idle machine). The shared pair is built here, as
a subclass of zaya's per-expert module, only to be measured. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "bench-lora"
sys.path.insert(0, str(ROOT))

from zaya import DEFAULT_MODEL, lora  # noqa: E402
from zaya.train import dist as dist_mod  # noqa: E402
from zaya.train import from_dict  # noqa: E402
from zaya.train.loop import Trainer  # noqa: E402


class SharedPair(lora.LoraExperts):
    """One (A, B) pair applied to every expert of a stack: stored with an expert dimension of 1."""

    def __init__(self, base, r, scaling, stacks):
        super().__init__(base, r, scaling, stacks)
        for stack in self.stacks:
            for k in "AB":
                name = f"{stack.removesuffix('_proj')}_lora_{k}"
                setattr(self, name, nn.Parameter(getattr(self, name)[:1].clone()))

    def _apply_stack(self, stack, e, x):
        y = F.linear(x, getattr(self, stack)[e])
        if stack in self.stacks:
            short = stack.removesuffix("_proj")
            a, b = (getattr(self, f"{short}_lora_{k}")[0].to(x.dtype) for k in "AB")
            y = y + F.linear(F.linear(x, a), b) * self.scaling
        return y


def snapshot_data(out: Path) -> Path:
    """The repository's docs copied once, so every variant reads the same text even while they change."""
    if not out.is_dir():
        out.mkdir(parents=True)
        for f in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
            (out / f.name).write_text(f.read_text())
    return out


def run(variant: str, args) -> dict:
    targets = ["attention"] if variant == "attention" else ["attention", "experts"]
    raw = {"model": {"init_from": str(args.model)},
           "data": {"train": [str(snapshot_data(OUT / "data") / "*.md")], "seq_len": args.seq_len, "holdout": 0.15},
           "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": 10, "weight_decay": 0.0},
           "train": {"out_dir": str(OUT / variant), "steps": args.steps,
                     "global_batch": 8, "micro_batch": 8, "progress": False, "eval_batches": 16},
           "lora": {"r": args.r, "alpha": 2 * args.r, "targets": targets}}
    real = lora.LoraExperts
    lora.LoraExperts = SharedPair if variant == "shared" else real  # apply_lora builds what this names
    try:
        trainer = Trainer(from_dict(raw), dist_mod.init("cpu"), resume=False, log=lambda *a, **k: None)
    finally:
        lora.LoraExperts = real
    before = trainer.evaluate()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
    seconds = (time.perf_counter() - t0) / args.steps
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"variant": variant, "trained_params": trained, "eval_before": round(before, 4),
            "eval_after": round(trainer.evaluate(), 4), "s_per_step": round(seconds, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = []
    for variant in ("attention", "per-expert", "shared"):
        rows.append(run(variant, args))
        r = rows[-1]
        print(f"{variant:>10}: {r['trained_params']:>9,} trained, eval loss {r['eval_before']:.4f} -> "
              f"{r['eval_after']:.4f}, {r['s_per_step']:.3f} s/step", flush=True)
    print(json.dumps({"model": str(args.model), "steps": args.steps, "r": args.r, "results": rows}))


if __name__ == "__main__":
    main()
